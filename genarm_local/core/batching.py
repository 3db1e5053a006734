"""Batched generation: B prompts stepped together — a thin layer over the continuous-batching scheduler.

All B sequences are submitted at once to a fresh Scheduler with B slots sized for the longest prompt + max_tokens,
so they are prefilled together and share every step's batch. generate_batch (api.py) and the batch runner build on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence

from .config import SamplingConfig
from .engine import Cancel, Engine, Step, is_set
from .errors import ContextOverflowError, InvalidOptionError
from .scheduler import Job, Scheduler


def batch_steps(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    config: SamplingConfig,
    weights: Mapping[str, float] | None = None,
    cancel: Cancel = None,
    finished: set[int] | None = None,
    seeds: Sequence[int | None] | None = None,
) -> Iterator[tuple[int, Step]]:
    """``steps`` for B prompts at once: one multi-sequence batch per step in fresh contexts (n_seq_max = B),
    one sampler chain per sequence (``seeds[index]``, by default seed + index). Yields (sequence index, Step);
    the caller may add an index to ``finished`` (a stop string) to drop that sequence from the next batch."""
    finished = finished if finished is not None else set()
    alphas = engine.alphas(weights)
    n_seq = len(prompts)
    if n_seq == 0 or any(len(prompt) == 0 for prompt in prompts):
        raise InvalidOptionError("generate_batch needs at least one prompt, and no empty prompt")
    per_sequence = max(len(prompt) for prompt in prompts) + config.max_tokens
    if per_sequence > engine.n_ctx:
        raise ContextOverflowError(
            f"the longest prompt + max_tokens ({per_sequence} tokens) exceed the context of {engine.n_ctx} tokens"
        )
    if seeds is None:
        seeds = [None if config.seed is None else config.seed + index for index in range(n_seq)]
    elif len(seeds) != n_seq:
        raise InvalidOptionError(f"{len(seeds)} seeds for {n_seq} prompts: give one seed per prompt")
    with Scheduler(engine, n_seq, per_sequence) as scheduler:
        jobs = [
            scheduler.submit(Job(list(prompt), dataclasses.replace(config, seed=seed), alphas))
            for prompt, seed in zip(prompts, seeds, strict=True)
        ]
        index_of = {id(job): index for index, job in enumerate(jobs)}
        while True:
            for index in finished:
                scheduler.release(jobs[index])
            if not scheduler.busy:
                return
            if is_set(cancel):
                for job in sorted(scheduler.running + list(scheduler.waiting), key=lambda job: index_of[id(job)]):
                    yield index_of[id(job)], Step(None, finish_reason="cancelled")
                return
            for job, step in scheduler.step():
                if step.finish_reason == "error":
                    raise job.error
                yield index_of[id(job)], step
