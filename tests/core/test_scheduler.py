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

    config = SamplingConfig.from_options({**SAMPLED, "max_tokens": 12, "seed": seed, **options})
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


@pytest.mark.parametrize("row_by_row", [False, True, None], ids=["batched", "one-row-at-a-time", "measured"])
def test_staggered_mixed_weights_equal_alone(model, files, row_by_row):
    from genarm_local.core.scheduler import Scheduler

    lora, big = files["lora"].stem, files["big"].stem
    weights = [{lora: 1.0, big: 0.0}, {lora: 0.0, big: 0.0}, {lora: 2.0, big: 0.5}, {lora: -0.5, big: 0.0}, {}]
    options = [{}, {}, {"guard_min_p": 0.05}, {"repeat_penalty": 1.3}, {"top_k": 5}]
    specs = [(p, 100 + i, w, o) for i, (p, w, o) in enumerate(zip(PROMPTS, weights, options, strict=True))]
    alone = [model.generate(p, max_tokens=12, seed=s, weights=w, **{**SAMPLED, **o}).tokens for p, s, w, o in specs]
    with Scheduler(model.engine, n_slots=4, row_by_row=row_by_row) as scheduler:
        jobs = [job(model, p, s, w, **o) for p, s, w, o in specs]
        tokens = run(scheduler, {0: jobs[:2], 3: jobs[2:4], 5: jobs[4:]})
    assert [tokens[id(j)] for j in jobs] == alone


def test_rows_go_one_at_a_time_only_where_measured_faster():
    from genarm_local.core.decode_times import DecodeTimes

    times = DecodeTimes(margin=0.85, refresh=4, smoothing=0.5)
    guided, base = (0, 1), (0,)
    singles = [(1, guided), (1, guided)]
    assert not times.faster_one_at_a_time(singles, (2, guided))  # nothing measured: batch, as llama.cpp does
    times.record((1, guided), 0.011)
    assert not times.faster_one_at_a_time(singles, (2, guided))  # the batch of 2 not measured yet
    times.record((2, guided), 0.038)
    assert times.faster_one_at_a_time(singles, (2, guided))  # 22 ms < 0.85 × 38 ms
    # a base-only row costs what it was measured to cost, not a guided row's time: one step row by row times it
    assert times.faster_one_at_a_time([(1, base), (1, guided)], (2, guided))
    times.record((1, base), 0.030)
    assert not times.faster_one_at_a_time([(1, base), (1, guided)], (2, guided))  # 41 ms vs 38
    times.record((1, base), 0.010)
    times.record((1, base), 0.010)
    times.record((1, base), 0.010)
    assert times.faster_one_at_a_time([(1, base), (1, guided)], (2, guided))
    # not clearly faster (within the margin): stay batched
    times.record((8, guided), 0.080)
    assert not times.faster_one_at_a_time([(1, guided)] * 8, (8, guided))  # 88 ms vs 80
    # every refresh-th step that would go row by row is batched again, to re-time the batch
    decisions = [times.faster_one_at_a_time(singles, (2, guided)) for _ in range(8)]
    assert [index for index, one_at_a_time in enumerate(decisions) if not one_at_a_time] == [1, 5]
    # smoothing: a slower batch later moves the estimate part of the way
    times.record((2, guided), 0.018)
    assert times.seconds((2, guided)) == pytest.approx(0.028)


def test_arm_contexts_decode_only_rows_that_use_them(model, files):
    from genarm_local.core.scheduler import Scheduler

    lora, big = files["lora"].stem, files["big"].stem
    with Scheduler(model.engine, n_slots=3) as scheduler:
        jobs = [job(model, PROMPTS[i], i, {lora: 0.0, big: 0.0}) for i in range(3)]
        run(scheduler, {0: jobs})
        assert scheduler._contexts[1] is None and scheduler._contexts[2] is None  # never even created
        base_decoded = scheduler._contexts[0].n_decoded
        mixed = [job(model, PROMPTS[3], 3, {lora: 1.0, big: 0.0}), job(model, PROMPTS[4], 4, {lora: 0.0, big: 0.0})]
        tokens = run(scheduler, {0: mixed})
        lora_context = scheduler._contexts[1]
        # the LoRA ARM decoded the first job's prompt and tokens only (its last token is sampled, not decoded)
        assert lora_context.n_decoded == len(mixed[0].tokens) + len(tokens[id(mixed[0])]) - 1
        assert scheduler._contexts[2] is None
        assert scheduler._contexts[0].n_decoded > base_decoded


def test_a_new_turn_reuses_its_slot_and_decodes_only_what_is_new(model, files):
    from genarm_local.core.config import SamplingConfig
    from genarm_local.core.scheduler import Job, Scheduler

    lora = files["lora"].stem
    with Scheduler(model.engine, n_slots=3) as scheduler:
        others = [job(model, PROMPTS[i], i, {lora: 1.0}) for i in (1, 2)]
        first = job(model, PROMPTS[0], 9, {lora: 1.0})
        tokens = run(scheduler, {0: [others[0], first, others[1]]})
        history = list(first.tokens) + tokens[id(first)] + model.tokenize(" and then", add_special=False)
        config = SamplingConfig.from_options(dict(SAMPLED, max_tokens=8, seed=4))
        turn = Job(history, config, list(model.arm_weights({lora: 1.0}).values()))
        tokens_again = run(scheduler, {0: [turn]})[id(turn)]
        assert turn.slot == first.slot  # the slot holding the longest common prefix
        # everything the first request left in the cache was reused: its prompt and all but its last token
        assert turn.cached_tokens == len(first.tokens) + len(tokens[id(first)]) - 1
        assert turn.timings.prompt_decoded == len(history) - turn.cached_tokens
        fresh = model.generate(history, max_tokens=8, seed=4, weights={lora: 1.0}, **SAMPLED).tokens
        assert tokens_again == fresh


def test_cancel_and_release_take_effect_at_the_next_step(model):
    from genarm_local.core.scheduler import Scheduler

    with Scheduler(model.engine, n_slots=2) as scheduler:
        jobs = [job(model, PROMPTS[i], i, {}, max_tokens=50) for i in range(3)]  # the third waits for a slot
        for j in jobs:
            scheduler.submit(j)
        scheduler.step()
        assert scheduler.running == jobs[:2] and list(scheduler.waiting) == [jobs[2]]
        jobs[0].cancel.set()
        scheduler.release(jobs[1])
        events = scheduler.step()
        assert events[0] == (jobs[0], events[0][1]) and events[0][1].finish_reason == "cancelled"
        assert [j for j, step in events[1:]] == [jobs[2]]  # the freed slot went to the waiting job at once
        assert scheduler.running == [jobs[2]]
        jobs[2].cancel.set()
        assert [step.finish_reason for _, step in scheduler.step()] == ["cancelled"]
        assert not scheduler.busy


def test_a_bad_job_fails_alone(model):
    from genarm_local.core.errors import ContextOverflowError, InvalidOptionError
    from genarm_local.core.scheduler import Scheduler

    with Scheduler(model.engine, n_slots=2, n_ctx=64) as scheduler:
        with pytest.raises(ContextOverflowError):
            scheduler.submit(job(model, PROMPTS[0], 1, {}, max_tokens=60))
        good, bad = job(model, PROMPTS[0], 1, {}), job(model, PROMPTS[1], 2, {}, grammar="root ::= (")
        tokens = run(scheduler, {0: [bad, good]})
        assert isinstance(bad.error, InvalidOptionError) and "grammar" in str(bad.error)
        assert tokens[id(good)] == model.generate(PROMPTS[0], max_tokens=12, seed=1, **SAMPLED).tokens
