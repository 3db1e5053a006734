"""The continuous-batching scheduler on the tiny fixtures: sequences that join mid-stream with their own weights,
seeds and sampling get exactly the tokens they get alone; ARM contexts decode only rows that use them; per-slot
prefix reuse; cancel and release within one step; a bad request fails only itself."""

from __future__ import annotations

import pytest
from cli_helpers import model_files

PROMPTS = [
    "The history of the bicycle",
    "Early designs had no pedals",
    "Cycling became popular with people of all ages, and",
    "In the city",
    "Roads were",
]
SAMPLED = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
EXACT = dict(n_ctx=256, n_threads=1, kv_cache_type="f32", flash_attn=False)


@pytest.fixture(scope="module")
def files(gguf_model, hf_model, lora_adapter, workdir):
    return model_files(gguf_model, hf_model, lora_adapter, workdir)


@pytest.fixture(scope="module")
def model(files):
    from genarm_local import GuidedModel

    arms = {str(files["lora"]): 1.0, str(files["big"]): 0.5}
    with GuidedModel(files["base"], arms, **EXACT) as guided:
        yield guided


def job(model, prompt: str, seed: int, weights: dict, **options):
    from genarm_local.core.config import SamplingConfig
    from genarm_local.core.scheduler import Job

    config = SamplingConfig.from_options(dict(SAMPLED, max_tokens=12, seed=seed, **options))
    return Job(model.tokenize(prompt), config, list(model.arm_weights(weights).values()))


def run(scheduler, jobs_by_step: dict[int, list]) -> dict:
    """Step the scheduler, submitting jobs_by_step[n] before step n; the tokens of every job."""
    tokens: dict = {}
    n = 0
    while n <= max(jobs_by_step) or scheduler.busy:
        for j in jobs_by_step.get(n, []):
            scheduler.submit(j)
            tokens[id(j)] = []
        for j, step in scheduler.step():
            if step.token is not None and step.finish_reason != "eos":
                tokens[id(j)].append(step.token)
        n += 1
    return tokens


def test_staggered_mixed_weights_equal_alone(model, files):
    from genarm_local.core.scheduler import Scheduler

    lora, big = files["lora"].stem, files["big"].stem
    weights = [{lora: 1.0, big: 0.0}, {lora: 0.0, big: 0.0}, {lora: 2.0, big: 0.5}, {lora: -0.5, big: 0.0}, {}]
    specs = [(p, 100 + i, w) for i, (p, w) in enumerate(zip(PROMPTS, weights, strict=True))]
    alone = [model.generate(p, max_tokens=12, seed=s, weights=w, **SAMPLED).tokens for p, s, w in specs]
    with Scheduler(model.engine, n_slots=4) as scheduler:
        jobs = [job(model, p, s, w) for p, s, w in specs]
        tokens = run(scheduler, {0: jobs[:2], 3: jobs[2:4], 5: jobs[4:]})
    assert [tokens[id(j)] for j in jobs] == alone
