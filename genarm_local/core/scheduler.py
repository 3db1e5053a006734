"""Continuous batching: up to N sequences stepped together, each with its own ARM weights, sampler chain, seed and
stop conditions. Sequences join at step boundaries after their prefill and leave when done.

llama-server's slot loop, in Python over the Engine's loaded models: one multi-sequence llama.cpp context per loaded
model (the base's; an ARM's is created when a sequence first needs it), with n_seq_max = N slots of ``n_ctx`` tokens
each. Every step:

 1. sequences whose cancel flag is set leave (so a cancel takes effect within one step);
 2. waiting sequences take free slots — the slot whose cached tokens share the longest prefix with the prompt, as
    llama-server chooses — and only the prompt tokens after that prefix (but the last) are prefilled, packed
    together in as few batches as fit;
 3. one batch per context holds the newest token of every running sequence that uses the context: the base
    decodes every row, an ARM only the rows whose α for it is ≠ 0 (an ARM that no running row uses is not decoded
    at all, and a row with α = 0 never needs that ARM's cache) -- or, where the scheduler has measured that this
    many rows go faster one at a time (DecodeTimes: small batches on the CPU), each row is decoded and sampled on
    its own;
 4. each row's ARM log-probs are mixed into its base row (Engine.mix: the fused kernel, in place) and the row's own
    sampler chain picks its token;
 5. a sequence that reached end of generation or max_tokens leaves; its tokens stay cached in the slot, so the next
    turn of a chat decodes only what is new.

A row's numbers depend on the others only through llama.cpp's batching: under exact settings (f32 KV cache, no flash
attention, one thread) a sequence gets the same tokens alone as among others. That is also why each slot has its own
KV stream (llama.cpp's default, not kv_unified): a sequence's cells lie the same way whoever else runs, so attention
sums in the same order. The price: llama.cpp runs a step's batch in one piece only over consecutive slot ids, so rows
in slots 0, 2 and 5 take three graph runs; on the CPU, where a batched step costs about its rows anyway, that was
within noise (4 rows in slots 0, 2, 4, 6 against 0-3, Gemma-3-270M, one thread). batching.batch_steps (generate_batch,
the batch runner) and the server are layers over this one loop.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .config import SamplingConfig
from .context import Batch, Context
from .engine import Arm, Engine, Step, Timings
from .errors import ContextOverflowError, GenArmError, InvalidOptionError
from .sampling import SamplerChain


@dataclass(eq=False)
class Job:
    """One sequence to generate: its prompt tokens, sampling settings (seed, max_tokens; stop strings are the
    caller's, who ``release``s the job when one appears) and every loaded ARM's α, in the Engine's order.

    ``cancel`` may be set from any thread; the scheduler fills in ``timings``, ``cached_tokens`` (prompt tokens
    whose KV was reused from the slot), ``slot`` and, when it fails the job, ``error``."""

    tokens: Sequence[int]
    config: SamplingConfig
    alphas: Sequence[float]
    cancel: threading.Event = field(default_factory=threading.Event)
    timings: Timings = field(default_factory=Timings)
    cached_tokens: int = 0
    slot: int | None = None
    error: GenArmError | None = None


@dataclass(eq=False)
class _Running:
    """A job in a slot: its sampler chain, the contexts it uses (0: the base, i: ARM i - 1) and its next token."""

    job: Job
    chain: SamplerChain
    contexts: list[int]
    active: list[tuple[Arm, float]]
    guided: bool
    guard_min_p: float
    scratch: np.ndarray | None
    next_token: int = 0
    generated: int = 0
    started: float = 0.0


def common_prefix(cached: Sequence[int], tokens: Sequence[int]) -> int:
    n = 0
    for a, b in zip(cached, tokens, strict=False):
        if a != b:
            break
        n += 1
    return n


class Scheduler:
    """``n_slots`` sequences of up to ``n_ctx`` tokens each (default: the Engine's context size), stepped together.
    Not thread-safe: one thread submits and steps; other threads may only set a job's ``cancel``."""

    def __init__(self, engine: Engine, n_slots: int, n_ctx: int | None = None, row_by_row: bool | None = None):
        if n_slots < 1:
            raise InvalidOptionError(f"the scheduler needs at least one slot, got {n_slots}")
        self.engine = engine
        self.n_slots = n_slots
        self.n_ctx = n_ctx or engine.n_ctx
        n_models = 1 + len(engine.arms)
        self._stack = contextlib.ExitStack()
        self._contexts: list[Context | None] = [None] * n_models
        self._batches: list[Batch | None] = [None] * n_models
        # The tokens each context holds in each slot's sequence (what prefix reuse compares), in order.
        self._cached: list[list[list[int]]] = [[[] for _ in range(n_slots)] for _ in range(n_models)]
        self._slots: list[_Running | None] = [None] * n_slots
        self._last_used = [0] * n_slots
        self._clock = 0
        self.waiting: deque[Job] = deque()
        # How a step's rows are decoded: None decides by measured times, True/False forces one row at a time/batches.
        self.row_by_row = row_by_row
        try:
            self._context(0)  # a base context that cannot be created fails here, not in the first request
        except BaseException:
            self._stack.close()
            raise

    # ---- what callers use ------------------------------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        """Queue ``job``; it takes a slot at the next step that has one free."""
        if not job.tokens:
            raise InvalidOptionError("empty prompt: give at least one token")
        if len(job.alphas) != len(self.engine.arms):
            raise InvalidOptionError(f"{len(job.alphas)} weights for {len(self.engine.arms)} loaded ARMs")
        if len(job.tokens) + job.config.max_tokens > self.n_ctx:
            raise ContextOverflowError(
                f"prompt ({len(job.tokens)} tokens) + max_tokens ({job.config.max_tokens}) exceed the context of "
                f"{self.n_ctx} tokens per sequence; shorten the prompt or lower max_tokens"
            )
        self.waiting.append(job)
        return job

    def release(self, job: Job) -> None:
        """Take ``job`` out without a final step (its caller saw a stop string); its tokens stay cached."""
        if job in self.waiting:
            self.waiting.remove(job)
        for slot, state in enumerate(self._slots):
            if state is not None and state.job is job:
                self._free(slot)

    @property
    def running(self) -> list[Job]:
        return [state.job for state in self._slots if state is not None]

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(state is not None for state in self._slots)

    def step(self) -> list[tuple[Job, Step]]:
        """One step for every running sequence (admitting waiting ones first): (job, Step) in slot order, after
        the final Steps of cancelled or failed jobs."""
        events: list[tuple[Job, Step]] = []
        self._drop_cancelled(events)
        self._admit(events)
        running = [(slot, state) for slot, state in enumerate(self._slots) if state is not None]
        if not running:
            return events
        # One batch per context, or one row at a time where that is faster (DecodeTimes).
        groups = [[entry] for entry in running] if self._one_row_at_a_time(running) else [running]
        for group in groups:
            rows = self._decode_group(group, events)
            if rows is None:  # a decode failed: every running job has failed
                return events
            # 4. Mix and sample each row (before the next group's decode overwrites the logits); finished rows leave.
            for slot, state in group:
                try:
                    step = self._sample(slot, state, rows)
                except GenArmError as exc:
                    state.job.error = exc
                    step = Step(None, finish_reason="error")
                events.append((state.job, step))
                if step.finish_reason:
                    self._free(slot)
        return events

    def _one_row_at_a_time(self, running: list[tuple[int, _Running]]) -> bool:
        if len(running) < 2 or self.row_by_row is False:
            return False
        if self.row_by_row:
            return True
        singles = [(1, tuple(state.contexts)) for _, state in running]
        return self.engine.decode_times.faster_one_at_a_time(singles, self._group_key(running))

    @staticmethod
    def _group_key(group: list[tuple[int, _Running]]) -> tuple[int, tuple[int, ...]]:
        return len(group), tuple(sorted({index for _, state in group for index in state.contexts}))

    def _decode_group(self, group: list[tuple[int, _Running]], events: list) -> list[dict[int, int]] | None:
        """3. One batch per context with the newest token of each row of ``group`` that uses it; returns, per
        context, slot → logits row (None if the decode failed and every running job with it)."""
        rows: list[dict[int, int]] = [{} for _ in self._contexts]
        for batch in self._batches:
            if batch is not None:
                batch.clear()
        for slot, state in group:
            for index in state.contexts:
                batch = self._batches[index]
                rows[index][slot] = batch.batch.n_tokens
                batch.add(state.next_token, len(self._cached[index][slot]), slot, True)
        decoding = [index for index, row in enumerate(rows) if row]
        start = time.perf_counter()
        try:
            self._decode({index: self._batches[index] for index in decoding})
        except GenArmError as exc:
            self._fail_all(exc, events)
            return None
        self.engine.decode_times.record(self._group_key(group), time.perf_counter() - start)
        for slot, state in group:
            for index in state.contexts:
                self._cached[index][slot].append(state.next_token)
        return rows

    # ---- the steps -------------------------------------------------------------------------------------------------

    def _drop_cancelled(self, events: list[tuple[Job, Step]]) -> None:
        for job in [job for job in self.waiting if job.cancel.is_set()]:
            self.waiting.remove(job)
            events.append((job, Step(None, finish_reason="cancelled")))
        for slot, state in enumerate(self._slots):
            if state is not None and state.job.cancel.is_set():
                self._free(slot)
                events.append((state.job, Step(None, finish_reason="cancelled")))

    def _admit(self, events: list[tuple[Job, Step]]) -> None:
        """2. Waiting jobs into free slots, first come first served; their prompts prefilled together."""
        admitted: list[int] = []
        while self.waiting and None in self._slots:
            job = self.waiting.popleft()
            try:
                state = self._start(job)
            except GenArmError as exc:
                job.error = exc
                events.append((job, Step(None, finish_reason="error")))
                continue
            slot = self._pick_slot(job.tokens)
            self._slots[slot], job.slot = state, slot
            admitted.append(slot)
        if not admitted:
            return
        start = time.perf_counter()
        prefill: dict[int, list[tuple[int, int, int]]] = {}
        for slot in admitted:
            state = self._slots[slot]
            prompt = state.job.tokens
            for index in state.contexts:
                cached = self._cached[index][slot]
                keep = common_prefix(cached, prompt[:-1])
                if keep < len(cached):
                    if not self._contexts[index].truncate(slot, keep):
                        keep = 0
                    del cached[keep:]
                prefill.setdefault(index, []).extend((prompt[pos], pos, slot) for pos in range(keep, len(prompt) - 1))
                if index == 0:
                    state.job.cached_tokens = keep
                    state.job.timings.prompt_tokens = len(prompt)
                    state.job.timings.prompt_decoded = len(prompt) - keep
        try:
            self._prefill(prefill)
        except GenArmError as exc:
            self._fail_all(exc, events)
            return
        now = time.perf_counter()
        for slot in admitted:
            state = self._slots[slot]
            for index in state.contexts:
                cached = self._cached[index][slot]
                cached.extend(state.job.tokens[len(cached) : -1])
            state.next_token = state.job.tokens[-1]
            state.job.timings.prompt_s, state.started = now - start, now

    def _start(self, job: Job) -> _Running:
        """A job's sampler chain and contexts; an error here (a bad grammar, 1 + Σα ≤ 0) fails only this job."""
        engine = self.engine
        active = engine.active_arms(job.alphas)
        scale = engine.temperature_scale(job.config, active)
        contexts = [0] + [index + 1 for index, alpha in enumerate(job.alphas) if alpha != 0.0]
        for index in contexts:
            self._context(index)
        # With no ARM active the row is left as llama.cpp produced it: plain llama.cpp sampling, bit for bit (the
        # guard belongs to the guided distribution too, as in Engine.steps).
        guided = bool(active) or job.config.normalized
        guard = job.config.guard_min_p if active else 0.0
        scratch = np.empty(engine.n_vocab, dtype=np.float32) if not guided and job.config.logprobs is not None else None
        chain = SamplerChain(job.config, engine.base_model, scale)
        return _Running(job, chain, contexts, active, guided, guard, scratch)

    def _pick_slot(self, tokens: Sequence[int]) -> int:
        """The free slot with the longest cached common prefix; among equals the least recently used."""
        free = [slot for slot, state in enumerate(self._slots) if state is None]
        return max(free, key=lambda slot: (common_prefix(self._cached[0][slot], tokens), -self._last_used[slot]))

    def _prefill(self, work: dict[int, list[tuple[int, int, int]]]) -> None:
        """Decode (token, position, slot) triples per context, in batches as large as the context takes."""
        work = {index: tokens for index, tokens in work.items() if tokens}
        if not work:
            return

        def decode_all(context: Context) -> None:
            index = self._contexts.index(context)
            batch, tokens = self._batches[index], work[index]
            for first in range(0, len(tokens), batch.capacity):
                batch.clear()
                for token, pos, slot in tokens[first : first + batch.capacity]:
                    batch.add(token, pos, slot, False)
                context.decode_batch(batch)

        contexts = [self._contexts[index] for index in work]
        with self.engine.thread_shares(contexts):
            self.engine.each(contexts, decode_all)

    def _decode(self, batches: dict[int, Batch]) -> None:
        contexts = [self._contexts[index] for index in batches]
        with self.engine.thread_shares(contexts):
            self.engine.each(contexts, lambda context: context.decode_batch(batches[self._contexts.index(context)]))

    def _sample(self, slot: int, state: _Running, rows: list[dict[int, int]]) -> Step:
        job, engine = state.job, self.engine
        contexts = [self._contexts[index] for index in state.contexts]
        row_indices = [rows[index][slot] for index in state.contexts]
        if state.guided:
            engine.mix(
                state.active, job.config.normalized, contexts=contexts, rows=row_indices, guard_min_p=state.guard_min_p
            )
        token = state.chain.sample(contexts[0], row_indices[0])
        step = Step(token)
        if job.config.logprobs is not None:
            step.logprob, step.top_logprobs = engine.read_logprobs(
                token, job.config.logprobs, state.scratch, contexts[0], row_indices[0]
            )
        state.generated += 1
        job.timings.generated_tokens = state.generated
        job.timings.generation_s = time.perf_counter() - state.started
        if engine.base_model.is_eog(token):
            step.finish_reason = "eos"
        elif state.generated == job.config.max_tokens:
            step.finish_reason = "length"
        state.next_token = token
        return step

    # ---- slots and contexts ----------------------------------------------------------------------------------------

    def _context(self, index: int) -> Context:
        """The multi-sequence context of model ``index`` (0: the base), created on first use."""
        if self._contexts[index] is None:
            engine = self.engine
            options = dict(n_ctx=self.n_ctx * self.n_slots, n_seq_max=self.n_slots, n_batch=max(512, self.n_slots))
            if index == 0:
                context = Context(engine.base_model, engine.config, **options)
            else:
                arm = engine.arms[index - 1]
                if arm.adapter is not None:
                    context = Context(engine.base_model, engine.config, adapters=[(arm.adapter, 1.0)], **options)
                else:
                    context = Context(arm.context.model, engine.config, **options)
            self._contexts[index] = self._stack.enter_context(context)
            self._batches[index] = self._stack.enter_context(Batch(context.n_batch))
        return self._contexts[index]

    def _free(self, slot: int) -> None:
        state, self._slots[slot] = self._slots[slot], None
        if state is not None:
            state.chain.close()
        self._clock += 1
        self._last_used[slot] = self._clock

    def _fail_all(self, exc: GenArmError, events: list[tuple[Job, Step]]) -> None:
        """A decode failed: llama.cpp's caches are in an unknown state, so every running job fails and every
        context starts empty (the scheduler itself keeps working)."""
        for slot, state in enumerate(self._slots):
            if state is not None:
                state.job.error = exc
                events.append((state.job, Step(None, finish_reason="error")))
                self._free(slot)
        for index, context in enumerate(self._contexts):
            if context is not None:
                context.clear()
            for cached in self._cached[index]:
                cached.clear()

    def close(self) -> None:
        for slot in range(self.n_slots):
            if self._slots[slot] is not None:
                self._free(slot)
        self._stack.close()

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
