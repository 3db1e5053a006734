"""The one decode loop (core/scheduler.py) on the tiny fixtures, stepped by hand: jobs that join mid-stream with their
own weights, seeds and sampling get the tokens they get alone; ARM contexts decode only rows that use them; prompts
are reused only in whole chunks; cancel within one step; a bad job fails alone; a failed decode in one context waits
for the others before anything is cleaned up."""

from __future__ import annotations

import time

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


def job(model, prompt, seed: int, weights: dict, **options):
    from genarm_local.core.config import SamplingConfig
    from genarm_local.core.scheduler import Job

    config = SamplingConfig.from_options({**SAMPLED, "max_tokens": 12, "seed": seed, **options})
    tokens = model.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
    return Job(tokens, config, list(model.arm_weights(weights).values()))


def run(scheduler, jobs_by_step: dict[int, list]) -> dict:
    """Step the scheduler, submitting jobs_by_step[n] before step n; every job's tokens and its last event."""
    tokens: dict = {}
    n = 0
    while n <= max(jobs_by_step) or scheduler.busy:
        for j in jobs_by_step.get(n, []):
            scheduler.check(j)
            scheduler.submit(j)
            tokens[id(j)] = []
        for j, event in scheduler.step():
            if event.token is not None:
                tokens[id(j)].append(event.token)
            if event.finish_reason:
                j.last = event
        n += 1
    return tokens


def scheduler_for(model, n_slots: int, n_ctx: int = 256):
    """A scheduler of its own over the model's loaded weights, stepped by the test (the model's own is stepped by its
    engine thread)."""
    from genarm_local.core.scheduler import Scheduler

    return Scheduler(model.engine, n_slots, n_ctx)


def test_staggered_jobs_with_their_own_settings_equal_alone(model, files):
    lora, big = files["lora"].stem, files["big"].stem
    weights = [{lora: 1.0, big: 0.0}, {lora: 0.0, big: 0.0}, {lora: 2.0, big: 0.5}, {lora: -0.5, big: 0.0}, {}]
    options = [{}, {"repeat_penalty": 1.3}, {"guard_min_p": 0.05}, {"frequency_penalty": 0.5}, {"top_k": 5}]
    specs = [(p, 100 + i, w, o) for i, (p, w, o) in enumerate(zip(PROMPTS, weights, options, strict=True))]
    alone = [model.generate(p, max_tokens=12, seed=s, weights=w, **{**SAMPLED, **o}).tokens for p, s, w, o in specs]
    with scheduler_for(model, 4) as scheduler:
        jobs = [job(model, p, s, w, **o) for p, s, w, o in specs]
        tokens = run(scheduler, {0: jobs[:2], 3: jobs[2:4], 5: jobs[4:]})
    assert [tokens[id(j)] for j in jobs] == alone


def test_arm_contexts_decode_only_rows_that_use_them(model, files):
    lora, big = files["lora"].stem, files["big"].stem
    with scheduler_for(model, 3) as scheduler:
        jobs = [job(model, PROMPTS[i], i, {lora: 0.0, big: 0.0}) for i in range(3)]
        run(scheduler, {0: jobs})
        base, lora_context, big_context = scheduler.contexts
        assert lora_context is None and big_context is None  # never even created
        base_decoded = base.n_decoded
        mixed = [job(model, PROMPTS[3], 3, {lora: 1.0, big: 0.0}), job(model, PROMPTS[4], 4, {lora: 0.0, big: 0.0})]
        tokens = run(scheduler, {0: mixed})
        lora_context = scheduler.contexts[1]
        # the LoRA ARM decoded the first job's prompt and tokens only (its last token is sampled, not decoded)
        assert lora_context.n_decoded == len(mixed[0].tokens) + len(tokens[id(mixed[0])]) - 1
        assert scheduler.contexts[2] is None
        assert base.n_decoded > base_decoded


def test_reusable_prefixes_are_whole_chunks_of_a_prompt():
    from genarm_local.core.scheduler import PREFILL_CHUNK as C
    from genarm_local.core.scheduler import reusable

    prompt = list(range(1000, 1000 + 3 * C + 10))
    # the same prompt again: its whole prefill, partial chunk included (all but the last token)
    assert reusable(prompt, len(prompt) - 1, prompt) == len(prompt) - 1
    # a longer prompt sharing it: only the whole chunks (the last, partial one was decoded as a shorter group)
    assert reusable(prompt, len(prompt) - 1, prompt + [7, 8, 9]) == 3 * C
    # tokens a step decoded (a reply) are never reused, even when the next prompt holds them
    cached = prompt + [1, 2, 3]
    assert reusable(cached, len(prompt) - 1, cached + [4]) == 3 * C
    # a divergence inside a chunk keeps the chunks before it
    other = prompt[: C + 5] + [0] * (2 * C)
    assert reusable(prompt, len(prompt) - 1, other) == C
    # a short prompt is one partial chunk: reused only by the same prompt
    short = list(range(40))
    assert reusable(short, 39, short) == 39 and reusable(short, 39, short + [5]) == 0


def test_a_new_turn_decodes_only_its_last_unfinished_chunk_and_what_follows(model, files):
    from genarm_local.core.config import SamplingConfig
    from genarm_local.core.scheduler import PREFILL_CHUNK, Job

    lora = files["lora"].stem
    long_prompt = model.tokenize(" ".join(PROMPTS) * 8)[: PREFILL_CHUNK + 40]
    with scheduler_for(model, 3) as scheduler:
        others = [job(model, PROMPTS[i], i, {lora: 1.0}) for i in (1, 2)]
        first = job(model, long_prompt, 9, {lora: 1.0})
        tokens = run(scheduler, {0: [others[0], first, others[1]]})
        history = list(first.tokens) + tokens[id(first)] + model.tokenize(" and then", add_special=False)
        config = SamplingConfig.from_options(dict(SAMPLED, max_tokens=8, seed=4))
        turn = Job(history, config, list(model.arm_weights({lora: 1.0}).values()))
        tokens_again = run(scheduler, {0: [turn]})[id(turn)]
        assert turn.slot == first.slot  # the slot holding the longest reusable prefix
        assert turn.cached_tokens == PREFILL_CHUNK  # the whole chunk of the first prompt, nothing after it
        assert turn.timings.prompt_decoded == len(history) - PREFILL_CHUNK
    fresh = model.generate(history, max_tokens=8, seed=4, weights={lora: 1.0}, **SAMPLED).tokens
    assert tokens_again == fresh


def test_cancel_takes_effect_at_the_next_step(model):
    with scheduler_for(model, 2) as scheduler:
        jobs = [job(model, PROMPTS[i], i, {}, max_tokens=50) for i in range(3)]  # the third waits for a slot
        for j in jobs:
            scheduler.submit(j)
        scheduler.step()
        assert scheduler.running == jobs[:2] and list(scheduler.waiting) == [jobs[2]]
        jobs[0].cancel.set()
        events = scheduler.step()
        assert events[0][0] is jobs[0] and events[0][1].finish_reason == "cancelled"
        assert {id(j) for j, _ in events[1:]} == {id(jobs[1]), id(jobs[2])}  # the freed slot went to the third at once
        jobs[1].cancel.set()
        jobs[2].cancel.set()
        assert [event.finish_reason for _, event in scheduler.step()] == ["cancelled", "cancelled"]
        assert not scheduler.busy


def test_stop_strings_end_a_job_in_the_step_that_completes_them(model):
    alone = model.generate(PROMPTS[0], max_tokens=12, temperature=0.0).text
    stop = alone[4:7]
    with scheduler_for(model, 2) as scheduler:
        stopped, other = job(model, PROMPTS[0], 1, {}, temperature=0.0, stop=[stop]), job(model, PROMPTS[1], 2, {})
        run(scheduler, {0: [stopped, other]})
    assert stopped.last.finish_reason == "stop" and other.last.finish_reason in ("length", "stop")


def test_a_bad_job_fails_alone(model):
    from genarm_local.core.errors import ContextOverflowError, InvalidOptionError

    with scheduler_for(model, 2, n_ctx=64) as scheduler:
        with pytest.raises(ContextOverflowError):
            scheduler.check(job(model, list(range(5, 300)), 1, {}))
    with scheduler_for(model, 2) as scheduler:
        good, bad = job(model, PROMPTS[0], 1, {}), job(model, PROMPTS[1], 2, {}, grammar="root ::= (")
        tokens = run(scheduler, {0: [bad, good]})
        assert bad.last.finish_reason == "error" and isinstance(bad.last.error, InvalidOptionError)
        assert "grammar" in str(bad.last.error)
    assert tokens[id(good)] == model.generate(PROMPTS[0], max_tokens=12, seed=1, **SAMPLED).tokens


def test_a_generation_runs_to_the_end_of_its_context_without_max_tokens(model):
    base = model.engine.base_model
    never_ends = {token: -100.0 for token in range(base.n_vocab) if base.is_eog(token)}
    with scheduler_for(model, 1, n_ctx=32) as scheduler:
        long = job(model, PROMPTS[2], 3, {}, max_tokens=None, logit_bias=never_ends)
        tokens = run(scheduler, {0: [long]})[id(long)]
    # every cell of the context used: the prompt, and every generated token but the last (sampled, not decoded)
    assert long.last.finish_reason == "length" and len(long.tokens) + len(tokens) - 1 == 32


def test_a_failed_decode_waits_for_every_context_then_fails_the_running_jobs(model, files, monkeypatch):
    """A failure injected into the LoRA ARM's context mid-generation, while the other ARM's context is still decoding
    on another thread: that decode has returned before the jobs fail and the caches are cleared; the scheduler then
    serves the next job as if nothing had happened."""
    from genarm_local.core.context import Context
    from genarm_local.core.errors import CorruptModelError

    lora, big = files["lora"].stem, files["big"].stem
    decode = Context.decode_batch
    in_decode = []  # contexts inside llama_decode right now
    failed_while = []  # what was still decoding when the scheduler cleared the caches
    calls = {"lora": 0}

    def slow_or_failing(context, batch):
        base, lora_context, big_context = scheduler.contexts
        if context is lora_context:
            calls["lora"] += 1
            if calls["lora"] == 4:  # mid-generation: after the prefill and two steps
                raise CorruptModelError("injected failure")
        in_decode.append(context)
        try:
            time.sleep(0.2 if context is big_context else 0)
            decode(context, batch)
        finally:
            in_decode.remove(context)

    scheduler = scheduler_for(model, 2)
    scheduler.engine.concurrent = True  # each context on its own thread, as on a CPU with a core per context
    reset = scheduler.reset
    monkeypatch.setattr(scheduler, "reset", lambda: (failed_while.append(list(in_decode)), reset()))
    monkeypatch.setattr(Context, "decode_batch", slow_or_failing)
    try:
        jobs = [job(model, PROMPTS[0], 1, {lora: 1.0, big: 0.5}, max_tokens=20), job(model, PROMPTS[1], 2, {})]
        run(scheduler, {0: jobs})
        assert [j.last.finish_reason for j in jobs] == ["error", "error"]
        assert "injected" in str(jobs[0].last.error)
        assert failed_while == [[]]  # nothing was still decoding when the caches were cleared
        monkeypatch.setattr(Context, "decode_batch", decode)
        again = job(model, PROMPTS[0], 1, {lora: 1.0, big: 0.5})
        tokens = run(scheduler, {0: [again]})[id(again)]
        assert again.last.finish_reason in ("length", "stop") and tokens
        assert tokens == model.generate(PROMPTS[0], max_tokens=12, seed=1, weights={lora: 1.0, big: 0.5},
                                        **SAMPLED).tokens  # fmt: skip
    finally:
        scheduler.engine.concurrent = None
        scheduler.close()
