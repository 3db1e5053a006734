"""Batched generation: B prompts stepped together, one multi-sequence llama.cpp batch per step.

The same story as Engine.steps (prefill → mix → sample → decode), with every running sequence's newest token in one
batch decoded by every context, and one sampler chain per sequence. generate_batch (api.py) and the batch runner
build on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence

from .config import SamplingConfig
from .context import Batch, Context
from .engine import Cancel, Engine, Step, is_set
from .errors import ContextOverflowError, InvalidOptionError
from .sampling import SamplerChain


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
    active = engine.active_arms(engine.alphas(weights))
    n_seq = len(prompts)
    if n_seq == 0 or any(len(prompt) == 0 for prompt in prompts):
        raise InvalidOptionError("generate_batch needs at least one prompt, and no empty prompt")
    per_sequence = max(len(prompt) for prompt in prompts) + config.max_tokens
    if per_sequence > engine.n_ctx:
        raise ContextOverflowError(
            f"the longest prompt + max_tokens ({per_sequence} tokens) exceed the context of {engine.n_ctx} tokens"
        )
    temperature_scale = engine.normalizer([a for _, a in active]) if config.normalized else 1.0
    if seeds is None:
        seeds = [None if config.seed is None else config.seed + index for index in range(n_seq)]
    elif len(seeds) != n_seq:
        raise InvalidOptionError(f"{len(seeds)} seeds for {n_seq} prompts: give one seed per prompt")
    with contextlib.ExitStack() as stack:
        options = dict(n_ctx=per_sequence * n_seq, n_seq_max=n_seq)
        base = stack.enter_context(Context(engine.base_model, engine.config, **options))
        arms = [
            stack.enter_context(
                Context(engine.base_model, engine.config, adapters=[(arm.adapter, 1.0)], **options)
                if arm.adapter
                else Context(arm.context.model, engine.config, **options)
            )
            for arm, _ in active
        ]
        contexts = [base, *arms]
        guided = bool(active) or config.normalized  # as in steps: unguided rows stay plain llama.cpp
        guard = config.guard_min_p if active else 0.0
        chains = [
            stack.enter_context(
                SamplerChain(dataclasses.replace(config, seed=seed), engine.base_model, temperature_scale)
            )
            for seed in seeds
        ]
        batch = stack.enter_context(Batch(max(n_seq, engine.base.n_batch)))
        stack.enter_context(engine.thread_shares(contexts))
        # 1. Prefill every prompt but its last token, the sequences packed together into full batches.
        prefill = [(prompt[pos], pos, seq) for seq, prompt in enumerate(prompts) for pos in range(len(prompt) - 1)]
        for start in range(0, len(prefill), batch.capacity):
            batch.clear()
            for token, pos, seq in prefill[start : start + batch.capacity]:
                batch.add(token, pos, seq, False)
            engine.each(contexts, lambda context: context.decode_batch(batch))
        pending = {seq: (prompt[-1], len(prompt) - 1) for seq, prompt in enumerate(prompts)}
        for index in range(config.max_tokens):
            running = [seq for seq in sorted(pending) if seq not in finished]
            if not running:
                return
            if is_set(cancel):
                for seq in running:
                    yield seq, Step(None, finish_reason="cancelled")
                return
            # 2. One batch holding every running sequence's newest token, decoded in every context.
            batch.clear()
            for seq in running:
                token, pos = pending[seq]
                batch.add(token, pos, seq, True)
            engine.each(contexts, lambda context: context.decode_batch(batch))
            for row, seq in enumerate(running):
                # 3. Mix and sample each sequence's row.
                if guided:
                    engine.mix(active, config.normalized, contexts=contexts, row=row, guard_min_p=guard)
                token = chains[seq].sample(base, row)
                step = Step(token)
                if engine.base_model.is_eog(token):
                    step.finish_reason = "eos"
                elif index + 1 == config.max_tokens:
                    step.finish_reason = "length"
                if step.finish_reason:
                    del pending[seq]
                else:
                    pending[seq] = (token, pending[seq][1] + 1)
                yield seq, step
