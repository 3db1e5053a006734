"""The one decode loop: the only place where a step decodes, mixes and samples.

Every way of generating — GuidedModel.generate, stream, chat, generate_batch and next_token_logprobs, the batch
runner, the Ray actors and the server — submits Jobs to the one Scheduler of its loaded model, which the engine thread
(engine.py) steps. llama-server's slot loop, in Python: one multi-sequence llama.cpp context per loaded model (the
base's; an ARM's is created when a job first needs it), with one KV stream of ``n_ctx`` cells per slot. Every step:

 1. cancelled jobs leave (a cancel takes effect within one step);
 2. waiting jobs take free slots, first come first served, and their prompts are prefilled (below);
 3. one batch per context holds the newest token of every running job that uses the context: the base decodes every
    row, an ARM only the rows whose α for it is ≠ 0 (a row with α = 0 never needs that ARM's cache);
 4. each row's guided logits are written into its base row (mixing.guide, in place) and the job's own llama.cpp
    sampler chain picks its token; the token's text goes through the job's StopText;
 5. a job that reached end of generation, a stop string, max_tokens or the end of its context leaves, in this same
    step; its tokens stay cached in the slot.

Which rows share a step is decided by the work alone — the jobs, in the order they were submitted — never by a
clock. What a row computes depends on the others only where llama.cpp makes it so: measured on Gemma-3-270M Q4_K_M
(CPU, default settings, weight repacking off: native.Model), a base row's logits are bit-identical alone and among up
to 7 others; a decode of 8 rows or more takes another llama.cpp kernel (faster, rounding differently), and its flash
attention splits a lone row's keys across threads once its cache passes 256 cells. A LoRA ARM's rows can round
differently among others after a few tokens.

Speculation (LoadConfig.draft_max = k > 0, for a sampling job with an ARM at α ≠ 0): in step 3 the base decodes the
newest token and then drafts k tokens alone, one decode each, from the guided formula with every ARM replaced by the
base (base · Π base^α: what an ARM that agrees with the base would give), through the job's sampling options; each ARM
decodes the newest token and the k drafts in one batch; then, position by position, a draft is kept with probability
min(1, p/q) (p: the guided distribution there, q: the draft's, both after the job's sampling options, grammar and
penalties at that point of the text) and the first one refused is replaced by a draw from max(0, p − q), normalised;
when all k are kept, one more token is drawn from p after them (Leviathan et al. 2023; Chen et al. 2023). The tokens
so emitted follow the guided distribution exactly. Refused drafts leave every cache (llama_memory_seq_rm). Such a job
draws with a generator of its own, seeded from its seed, rather than llama.cpp's dist sampler, so a seed gives the
same text on every run, but not the text it gives without speculation.

Prompts. A prompt's tokens but the last are decoded in chunks that start at multiples of PREFILL_CHUNK, each chunk of
one sequence alone, and the last token with the job's first step. llama.cpp's numbers depend on how a sequence's
tokens were grouped into decodes (the same prefix decoded as 8 + 72 or as 10 × 8 tokens differs by up to 1 in a
logit), so a cached prefix is reused only where a fresh decode would have grouped its tokens the same way: whole
chunks of an earlier prompt's prefill, or the whole of it when the prompt but its last token is the same. Tokens a
step decoded (an earlier reply) are never reused for a prompt. So a prompt gives the same numbers whatever the slot
held before, and a chat turn decodes only its last unfinished chunk and what follows.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .config import SamplingConfig
from .context import Batch, Context
from .errors import GenArmError, InvalidOptionError
from .mixing import guide, log_softmax
from .sampling import SamplerChain
from .text import StopText

if TYPE_CHECKING:
    from .engine import Arm, Engine

# Prompt tokens are decoded in chunks starting at multiples of this, and reused only in whole chunks (module
# docstring). 128 keeps llama.cpp's prompt speed (measured on 2 cores: 64-token chunks ~15% slower, 128 as fast as
# 512) while a chat turn re-decodes at most 127 tokens of the history before its new ones.
PREFILL_CHUNK = 128

# Merged contexts (LoadConfig.merge_arms) kept while no job uses them, for requests with the same ratio of weights.
MERGED_CONTEXTS = 2


@dataclass
class Timings:
    prompt_tokens: int = 0
    prompt_decoded: int = 0  # tokens actually decoded in the base context (the rest came from the KV cache)
    prompt_s: float = 0.0
    generated_tokens: int = 0
    generation_s: float = 0.0

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_decoded / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def generated_tokens_per_s(self) -> float:
        return self.generated_tokens / self.generation_s if self.generation_s > 0 else 0.0


@dataclass
class Event:
    """What one step gave a job: a sampled token and the text that became final with it (whole characters, stop
    strings left out), or, on the last event, why the job ended: "stop" (end of generation or a stop string, as
    OpenAI says it), "length", "cancelled", "logprobs" (a next_token_logprobs job, done) or "error" (with
    ``error``)."""

    token: int | None = None
    text: str = ""
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None
    error: GenArmError | None = None


@dataclass(eq=False)
class Job:
    """One sequence to generate: its prompt tokens, sampling settings (seed, max_tokens, stop strings) and every
    loaded ARM's α, in the Engine's order (an ARM loaded since the job was made: α = 0, filled in when it starts).
    ``on_event`` receives the job's events, on the engine thread, in order; it must not block. ``logprobs_into``:
    instead of sampling, write the guided next-token log-probabilities after the prompt there and end
    (next_token_logprobs).

    ``cancel`` may be set from any thread; the scheduler fills in ``timings``, ``cached_tokens`` (prompt tokens whose
    KV was reused from the slot) and ``slot``."""

    tokens: Sequence[int]
    config: SamplingConfig
    alphas: Sequence[float]
    on_event: Callable[[Event], None] = lambda event: None
    logprobs_into: np.ndarray | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    timings: Timings = field(default_factory=Timings)
    cached_tokens: int = 0
    slot: int | None = None


@dataclass(eq=False)
class _Running:
    """A job in a slot: the contexts it uses (0: the base, i: ARM i - 1), its ARMs with α ≠ 0, its sampler chain and
    text, and the token to decode next."""

    job: Job
    contexts: list[int]
    active: list[tuple[Arm | None, float]]  # in the order of contexts[1:]; None: the ARMs merged in one context
    chain: SamplerChain | None  # built with picks=False when the job speculates
    text: StopText
    logprob_scale: float
    draft_max: int = 0  # speculation: up to this many drafted tokens a step; 0: one token a step
    rng: np.random.Generator | None = None  # a speculating job's draws
    next_token: int = 0
    generated: int = 0
    started: float = 0.0


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """A token drawn from the (unnormalised, non-negative) weights ``probs``."""
    cumulative = np.cumsum(probs)
    return int(min(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"), len(probs) - 1))


class Cancelled(Exception):
    """A job's prefill stopped because the job was cancelled or the engine is closing."""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def reusable(cached: Sequence[int], exact: int, tokens: Sequence[int]) -> int:
    """How many positions of a prompt's prefill (``tokens`` but the last) a slot can keep from its cache, where the
    cache's first ``exact`` tokens came from such a prefill: whole chunks that a fresh prefill would decode the same
    way, or the whole prefill when it is the same (module docstring)."""
    target = len(tokens) - 1
    common = common_prefix(cached[:exact], tokens[:target])
    if common == exact == target:
        return target
    return min(common, exact, target) // PREFILL_CHUNK * PREFILL_CHUNK


class Scheduler:
    """``n_slots`` sequences of up to ``n_ctx`` tokens each, stepped together. Not thread-safe: one thread (the engine
    thread) submits and steps; other threads may only set a job's ``cancel``."""

    def __init__(self, engine: Engine, n_slots: int, n_ctx: int):
        if n_slots < 1:
            raise InvalidOptionError(f"the scheduler needs at least one slot, got {n_slots}")
        self.engine = engine
        self.n_slots = n_slots
        self.n_ctx = n_ctx
        n_models = 1 + len(engine.arms)
        # What each context runs: None (the base), an ARM's index in engine.arms, or a merged key
        # (LoadConfig.merge_arms: ((ARM index, adapter scale), ...)); and the way back.
        self._owners: list[int | tuple | None] = [None, *range(len(engine.arms))]
        self._where: dict[int | tuple | None, int] = {owner: index for index, owner in enumerate(self._owners)}
        self._contexts: list[Context | None] = [None] * n_models
        self._batches: list[Batch | None] = [None] * n_models
        # Per context and slot: the tokens its KV cache holds, in order, and how many of them a prompt's prefill
        # decoded (what reuse may keep).
        self._cached: list[list[list[int]]] = [[[] for _ in range(n_slots)] for _ in range(n_models)]
        self._exact: list[list[int]] = [[0] * n_slots for _ in range(n_models)]
        self._slots: list[_Running | None] = [None] * n_slots
        self._last_used = [0] * n_slots
        self._clock = 0
        self._scratch = np.empty(engine.n_vocab, dtype=np.float32)  # reported log-probs
        self.waiting: deque[Job] = deque()
        self.drafted = self.refused = 0  # speculation: drafts checked, and of those refused (an acceptance rate)
        self.stopping = threading.Event()  # set by the engine when it closes: a long prefill stops between chunks
        self._context(0)  # a base context that cannot be created fails here, not in the first request

    # ---- what the engine thread uses -------------------------------------------------------------------------------

    def check(self, job: Job) -> None:
        """Refuse a job that can never run (any thread: reads only settings)."""
        if not job.tokens:
            raise InvalidOptionError("empty prompt: give at least one token")
        if len(job.alphas) > len(self.engine.arms):  # fewer: made before an ARM was loaded (Engine.add_arm)
            raise InvalidOptionError(f"{len(job.alphas)} weights for {len(self.engine.arms)} loaded ARMs")
        self.engine.check_prompt(len(job.tokens))

    def submit(self, job: Job) -> None:
        """Queue ``job``; it takes a slot at the next step that has one free."""
        self.waiting.append(job)

    def add_model(self) -> None:
        """Make room for the context of an ARM that was just loaded (Engine.add_arm, between two steps); like every
        context, it is created when a job first needs it."""
        self._new_index(len(self.engine.arms))  # the engine appends the ARM after this

    def _new_index(self, owner: int | tuple) -> int:
        index = len(self._contexts)
        self._owners.append(owner)
        self._where[owner] = index
        self._contexts.append(None)
        self._batches.append(None)
        self._cached.append([[] for _ in range(self.n_slots)])
        self._exact.append([0] * self.n_slots)
        return index

    @property
    def running(self) -> list[Job]:
        return [state.job for state in self._slots if state is not None]

    @property
    def contexts(self) -> list[Context | None]:
        """Each model's context (0: the base, i: ARM i - 1), None where no job has needed it yet."""
        return list(self._contexts)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(state is not None for state in self._slots)

    def step(self) -> list[tuple[Job, Event]]:
        """One step for every running job, admitting waiting ones first: (job, Event) pairs, the final events of
        cancelled or failed jobs first, then one per running job in slot order."""
        events: list[tuple[Job, Event]] = []
        self._drop_cancelled(events)
        self._admit(events)
        running = [(slot, state) for slot, state in enumerate(self._slots) if state is not None]
        if not running:
            return events
        plain = [(slot, state) for slot, state in running if not state.draft_max]
        if plain:
            rows = self._decode(plain, events)
            if rows is None:  # a decode failed: every running job has failed
                return events
            for slot, state in plain:
                event = self._sample(slot, state, rows)
                events.append((state.job, event))
                if event.finish_reason:
                    self._free(slot)
        speculating = [(slot, state) for slot, state in running if state.draft_max and self._slots[slot] is state]
        if speculating:
            self._speculate(speculating, events)
        return events

    def cancel_all(self, reason: GenArmError | None = None) -> list[tuple[Job, Event]]:
        """End every job, waiting or running: cancelled, or failed with ``reason``."""
        events: list[tuple[Job, Event]] = []
        for job in self.waiting:
            events.append((job, self._final(reason)))
        self.waiting.clear()
        for slot, state in enumerate(self._slots):
            if state is not None:
                event = self._final(reason)
                event.text = "" if reason else state.text.flush()
                events.append((state.job, event))
                self._free(slot)
        return events

    def reset(self) -> None:
        """Forget every cached token: after a failure the caches are in an unknown state."""
        for index, context in enumerate(self._contexts):
            if context is not None:
                context.clear()
            for slot in range(self.n_slots):
                self._cached[index][slot].clear()
                self._exact[index][slot] = 0

    @staticmethod
    def _final(reason: GenArmError | None) -> Event:
        return Event(finish_reason="error", error=reason) if reason else Event(finish_reason="cancelled")

    # ---- 1, 2: cancelled jobs leave, waiting ones come in ---------------------------------------------------------

    def _drop_cancelled(self, events: list[tuple[Job, Event]]) -> None:
        for job in [job for job in self.waiting if job.cancel.is_set()]:
            self.waiting.remove(job)
            events.append((job, Event(finish_reason="cancelled")))
        for slot, state in enumerate(self._slots):
            if state is not None and state.job.cancel.is_set():
                events.append((state.job, Event(text=state.text.flush(), finish_reason="cancelled")))
                self._free(slot)

    def _admit(self, events: list[tuple[Job, Event]]) -> None:
        """Waiting jobs into free slots, in order, each prefilled on its own (module docstring)."""
        while self.waiting and None in self._slots:
            job = self.waiting.popleft()
            try:
                state = self._start(job)
            except GenArmError as exc:
                events.append((job, Event(finish_reason="error", error=exc)))
                continue
            slot = self._pick_slot(job.tokens)
            job.slot = slot
            start = time.perf_counter()
            try:
                self._prefill(slot, state)
            except (GenArmError, Cancelled) as exc:
                self._forget(slot, state.contexts)
                if state.chain is not None:
                    state.chain.close()
                error = exc if isinstance(exc, GenArmError) else None
                events.append((job, Event(finish_reason="error", error=error) if error else self._final(None)))
                continue
            state.started = time.perf_counter()
            job.timings.prompt_s = state.started - start
            self._slots[slot] = state

    def _start(self, job: Job) -> _Running:
        """A job's contexts, sampler chain and text; an error here (a bad grammar or logit bias) fails only this job."""
        engine = self.engine
        # α = 0 for the ARMs loaded after the job was made; its weights stay in the engine's order of ARMs
        job.alphas = [*job.alphas, *[0.0] * (len(engine.arms) - len(job.alphas))]
        weighted = [(index, alpha) for index, alpha in enumerate(job.alphas) if alpha != 0.0]
        merged = [(i, alpha) for i, alpha in weighted if alpha > 0 and engine.arms[i].adapter is not None]
        if not engine.config.merge_arms or len(merged) < 2:
            merged = []
        exact = [pair for pair in weighted if pair not in merged]
        contexts = [0] + [self._where[i] for i, _ in exact]
        active: list[tuple[Arm | None, float]] = [(engine.arms[i], alpha) for i, alpha in exact]
        if merged:
            total = sum(alpha for _, alpha in merged)
            contexts.append(self._merged_index(tuple((i, alpha / total) for i, alpha in merged)))
            active.append((None, total))
        for index in contexts:
            self._context(index)
        config = job.config
        chain, rng = None, None
        draft_max = engine.config.draft_max if job.logprobs_into is None and active else 0
        if job.logprobs_into is None:
            scale = engine.temperature_factor(config, active)
            chain = SamplerChain(
                config, engine.base_model, scale, history=job.tokens, n_ctx=self.n_ctx, picks=not draft_max
            )
            if draft_max:
                rng = np.random.default_rng(config.seed)
        logprob_scale = 1.0 / engine.normalizer([alpha for _, alpha in active]) if config.normalized else 1.0
        text = StopText(engine.base_model.token_bytes, config.stop, config.stop_at_turns)
        return _Running(job, contexts, active, chain, text, logprob_scale, draft_max, rng)

    def _pick_slot(self, tokens: Sequence[int]) -> int:
        """The free slot whose base cache keeps the most of this prompt; among equals the least recently used."""
        free = [slot for slot, state in enumerate(self._slots) if state is None]
        cached, exact = self._cached[0], self._exact[0]
        return max(free, key=lambda slot: (reusable(cached[slot], exact[slot], tokens), -self._last_used[slot]))

    def _prefill(self, slot: int, state: _Running) -> None:
        """Decode the prompt but its last token in each of the job's contexts, after what the slot keeps; in chunks
        that start at multiples of PREFILL_CHUNK, this sequence alone in each decode."""
        job, tokens = state.job, state.job.tokens
        target = len(tokens) - 1
        starts = {}
        for index in state.contexts:
            cached = self._cached[index][slot]
            keep = reusable(cached, self._exact[index][slot], tokens)
            if keep < len(cached) and not self._contexts[index].truncate(slot, keep):
                keep = 0  # a cache that cannot cut a sequence there starts it over
            del cached[keep:]
            self._exact[index][slot] = keep
            starts[index] = keep
        job.cached_tokens = starts[0]
        job.timings.prompt_tokens = len(tokens)
        job.timings.prompt_decoded = len(tokens) - starts[0]

        def decode(context: Context) -> None:
            index = self._contexts.index(context)
            batch, position = self._batches[index], starts[index]
            while position < target:
                if job.cancel.is_set() or self.stopping.is_set():
                    raise Cancelled
                end = min(target, (position // PREFILL_CHUNK + 1) * PREFILL_CHUNK)
                batch.clear()
                for pos in range(position, end):
                    batch.add(tokens[pos], pos, slot, False)
                context.decode_batch(batch)
                self._cached[index][slot].extend(tokens[position:end])
                self._exact[index][slot] = position = end

        contexts = [self._contexts[index] for index in state.contexts if starts[index] < target]
        if contexts:
            with self.engine.thread_shares(contexts):
                self.engine.each(contexts, decode)
        state.next_token = tokens[-1]

    # ---- 3, 4, 5: decode, mix and sample, finish -------------------------------------------------------------------

    def _decode(self, running: list[tuple[int, _Running]], events: list) -> list[dict[int, int]] | None:
        """One batch per context with the newest token of each running job that uses it; returns, per context,
        slot → logits row (None if the decode failed, and with it every running job)."""
        rows: list[dict[int, int]] = [{} for _ in self._contexts]
        for batch in self._batches:
            if batch is not None:
                batch.clear()
        for slot, state in running:
            for index in state.contexts:
                batch = self._batches[index]
                rows[index][slot] = batch.batch.n_tokens
                batch.add(state.next_token, len(self._cached[index][slot]), slot, True)
        contexts = [self._contexts[index] for index, used in enumerate(rows) if used]
        try:
            with self.engine.thread_shares(contexts):
                self.engine.each(contexts, lambda context: context.decode_batch(self._batches[self._index(context)]))
        except GenArmError as exc:  # the caches are in an unknown state: the running jobs fail, the waiting ones wait
            for slot, state in running:
                events.append((state.job, Event(finish_reason="error", error=exc)))
                self._free(slot)
            self.reset()
            return None
        for slot, state in running:
            for index in state.contexts:
                self._cached[index][slot].append(state.next_token)
        return rows

    def _sample(self, slot: int, state: _Running, rows: list[dict[int, int]]) -> Event:
        """Mix the row's ARMs into its base row, then sample it (or report its log-probs); the job's Event."""
        job, engine = state.job, self.engine
        base = self._contexts[0]
        row = rows[0][slot]
        config = job.config
        try:
            if state.active:  # no ARM active: the base's own row (the guard bounds a mix, and there is none)
                arms = [self._contexts[index].logits_address(rows[index][slot]) for index in state.contexts[1:]]
                address = base.logits_address(row)
                guide(
                    address,
                    address,
                    arms,
                    [alpha for _, alpha in state.active],
                    n_vocab=engine.n_vocab,
                    guard_min_p=config.guard_min_p,
                )
            if job.logprobs_into is not None:
                log_softmax(
                    job.logprobs_into, base.logits_address(row), n_vocab=engine.n_vocab, scale=state.logprob_scale
                )
                return Event(finish_reason="logprobs")
            token = state.chain.sample(base, row)
            event = Event(token)
            if config.logprobs is not None:
                event.logprob, event.top_logprobs = self._logprobs(base.logits_address(row), token, state)
        except GenArmError as exc:
            return Event(finish_reason="error", error=exc)
        return self._emit(state, event, len(self._cached[0][slot]))

    def _emit(self, state: _Running, event: Event, n_cached: int) -> Event:
        """The job's ``event`` for its sampled token, with the text it completes and whether the job ends there
        (end of generation, a stop string, max_tokens, or ``n_cached`` tokens before it filling the context)."""
        job, token = state.job, event.token
        state.generated += 1
        job.timings.generated_tokens = state.generated
        job.timings.generation_s = time.perf_counter() - state.started
        state.next_token = token
        if self.engine.base_model.is_eog(token):
            event.text, event.finish_reason = state.text.flush(), "stop"
            return event
        event.text, stopped = state.text.push(token)
        if stopped:
            event.finish_reason = "stop"
        elif state.generated == job.config.max_tokens or n_cached >= self.n_ctx:
            event.text += state.text.flush()
            event.finish_reason = "length"
        return event

    def _logprobs(self, row, token: int, state: _Running):
        """The sampled token's log-prob under the guided distribution (before penalties and temperature) and the
        top_n alternatives, from the guided logits ``row`` (an address or an array)."""
        values, top_n = self._scratch, state.job.config.logprobs
        log_softmax(values, row, n_vocab=self.engine.n_vocab, scale=state.logprob_scale)
        top: dict[int, float] = {}
        if top_n:
            best = np.argpartition(values, -top_n)[-top_n:]
            top = {int(t): float(values[t]) for t in best[np.argsort(values[best])[::-1]]}
        return float(values[token]), top

    # ---- 3, 4, 5 for speculating jobs (module docstring) -------------------------------------------------------------

    def _speculate(self, running: list[tuple[int, _Running]], events: list) -> None:
        """One speculative round for each of these jobs: draft in the base, check in every ARM, keep or replace."""
        drafts: dict[int, list[int]] = {}
        base_rows: dict[int, list[np.ndarray]] = {}
        draft_probs: dict[int, list[np.ndarray]] = {}
        try:
            self._draft(running, drafts, base_rows, draft_probs)
            arm_rows = self._check_drafts(running, drafts)
        except GenArmError as exc:  # the caches are in an unknown state: these jobs fail, as in _decode
            for slot, state in running:
                events.append((state.job, Event(finish_reason="error", error=exc)))
                self._free(slot)
            self.reset()
            return
        for slot, state in running:
            start = len(self._cached[0][slot]) - len(drafts[slot]) - 1  # where this round's first token went
            kept = 0
            for position, row in enumerate(base_rows[slot]):
                try:
                    event, drafted = self._verify(slot, state, position, row, arm_rows, drafts[slot], draft_probs[slot])
                except GenArmError as exc:
                    event, drafted = Event(finish_reason="error", error=exc), False
                if event.finish_reason != "error":
                    event = self._emit(state, event, start + position + 1)
                events.append((state.job, event))
                if position < len(drafts[slot]) and event.finish_reason != "error":
                    self.drafted += 1
                    self.refused += not drafted
                kept = position + 1  # the round's first token and the drafts kept before this one stay cached
                if event.finish_reason or not drafted:
                    break
            for index in state.contexts:  # refused drafts leave every cache
                cached = self._cached[index][slot]
                if len(cached) > start + kept:
                    if not self._contexts[index].truncate(slot, start + kept):
                        self._forget(slot, state.contexts)
                        if not events[-1][1].finish_reason:  # a job that ended this round keeps its ending
                            failure = GenArmError("llama.cpp could not drop refused drafts")
                            events.append((state.job, Event(finish_reason="error", error=failure)))
                        break
                    del cached[start + kept :]
            if events[-1][1].finish_reason:
                self._free(slot)

    def _draft(self, running, drafts: dict, base_rows: dict, draft_probs: dict) -> None:
        """Decode each job's newest token in the base, then draft its tokens one decode at a time; keep a copy of
        every base row (the ARMs' check mixes them) and each draft's distribution."""
        base, batch = self._contexts[0], self._batches[0]
        limits, drafters = {}, {}
        for slot, state in running:
            room = self.n_ctx - len(self._cached[0][slot]) - 1  # the newest token and the drafts must fit
            left = (state.job.config.max_tokens or 1 << 30) - state.generated - 1  # the round emits up to k + 1
            limits[slot] = max(0, min(state.draft_max, room, left))
            drafts[slot], base_rows[slot], draft_probs[slot] = [], [], []
            drafters[slot] = state.chain.clone()
        try:
            for depth in range(max(limits.values()) + 1):
                batch.clear()
                members = [(slot, state) for slot, state in running if depth <= limits[slot]]
                for slot, state in members:
                    token = drafts[slot][-1] if depth else state.next_token
                    batch.add(token, len(self._cached[0][slot]), slot, True)
                    self._cached[0][slot].append(token)
                base.decode_batch(batch)
                for row, (slot, state) in enumerate(members):
                    logits = base.logits_row(row).copy()
                    base_rows[slot].append(logits)
                    if depth == limits[slot]:
                        continue
                    # the draft: the guided formula with every ARM replaced by the base itself (a job drafts only
                    # with an ARM active)
                    mixed = logits.copy()
                    guide(mixed, mixed, [logits] * len(state.active), [alpha for _, alpha in state.active],
                          guard_min_p=state.job.config.guard_min_p)  # fmt: skip
                    probs = drafters[slot].probabilities(mixed)
                    token = draw(probs, state.rng)
                    drafters[slot].accept(token)
                    drafts[slot].append(token)
                    draft_probs[slot].append(probs)
        finally:
            for drafter in drafters.values():
                drafter.close()

    def _check_drafts(self, running, drafts: dict) -> list[dict[int, int]]:
        """Each ARM context decodes, per job, its newest token and drafts in one batch; per context, slot → the
        logits row of its first token (the others follow it)."""
        rows: list[dict[int, int]] = [{} for _ in self._contexts]
        used = sorted({index for _, state in running for index in state.contexts[1:]})
        for index in used:
            batch = self._batches[index]
            batch.clear()
            for slot, state in running:
                if index in state.contexts:
                    rows[index][slot] = batch.batch.n_tokens
                    for token in [state.next_token, *drafts[slot]]:
                        batch.add(token, len(self._cached[index][slot]), slot, True)
                        self._cached[index][slot].append(token)
        contexts = [self._contexts[index] for index in used]
        with self.engine.thread_shares(contexts):
            self.engine.each(contexts, lambda context: context.decode_batch(self._batches[self._index(context)]))
        return rows

    def _verify(self, slot, state: _Running, position: int, row: np.ndarray, arm_rows, drafts, draft_probs):
        """The token at ``position`` of the round and whether it is the draft there, kept with probability
        min(1, p/q); else a draw from max(0, p − q), or after the last draft a draw from p. ``row`` (the base's
        logits there) becomes the guided logits."""
        config = state.job.config
        arms = [self._contexts[index].logits_address(arm_rows[index][slot] + position) for index in state.contexts[1:]]
        guide(row, row, arms, [alpha for _, alpha in state.active], guard_min_p=config.guard_min_p)
        p = state.chain.probabilities(row)
        drafted = position < len(drafts)
        if drafted:
            token, q = drafts[position], draft_probs[position]
            drafted = state.rng.random() * q[token] < p[token]
            if not drafted:
                residual = np.maximum(p - q, 0.0)
                token = draw(residual if residual.sum() > 0.0 else p, state.rng)
        else:
            token = draw(p, state.rng)
        state.chain.accept(token)
        event = Event(token)
        if config.logprobs is not None:
            event.logprob, event.top_logprobs = self._logprobs(row, token, state)
        return event, drafted

    # ---- slots and contexts ----------------------------------------------------------------------------------------

    def _context(self, index: int) -> Context:
        """The multi-sequence context of model ``index`` (0: the base), created on first use."""
        if self._contexts[index] is None:
            # a decode holds a prompt chunk or a step's rows, never more: llama.cpp sizes its compute buffers and
            # the sliding-window layers' caches by n_batch, so a small one saves memory per slot
            n_batch = max(PREFILL_CHUNK, self.n_slots)
            owner, cells = self._owners[index], self.n_ctx * self.n_slots
            if isinstance(owner, tuple):
                context = self.engine.new_merged_context(owner, cells, self.n_slots, n_batch)
            else:
                context = self.engine.new_context(0 if owner is None else owner + 1, cells, self.n_slots, n_batch)
            self._contexts[index] = context
            try:
                self._batches[index] = Batch(context.n_batch)
            except BaseException:
                self._close(index)
                raise
        return self._contexts[index]

    def _merged_index(self, key: tuple) -> int:
        """The context that runs the base with these adapters at these scales (LoadConfig.merge_arms): the one
        made for an earlier job, else a new one, in place of a merged context no running job uses once there are
        MERGED_CONTEXTS (each holds every slot's KV cache)."""
        if key in self._where:
            return self._where[key]
        used = {index for state in self._slots if state is not None for index in state.contexts}
        merged = [index for index, owner in enumerate(self._owners) if isinstance(owner, tuple)]
        idle = [index for index in merged if index not in used]
        if len(merged) < MERGED_CONTEXTS or not idle:
            return self._new_index(key)
        index = idle[0]
        self._close(index)
        del self._where[self._owners[index]]
        self._owners[index], self._where[key] = key, index
        return index

    def _close(self, index: int) -> None:
        """Free a context and its batch, and forget what its slots held."""
        for resource in (self._batches[index], self._contexts[index]):
            if resource is not None:
                resource.close()
        self._contexts[index] = self._batches[index] = None
        for slot in range(self.n_slots):
            self._cached[index][slot].clear()
            self._exact[index][slot] = 0

    def _index(self, context: Context) -> int:
        return next(index for index, c in enumerate(self._contexts) if c is context)

    def _forget(self, slot: int, contexts: Sequence[int]) -> None:
        """Drop a slot's cache in these contexts (its prefill failed half-way)."""
        for index in contexts:
            self._contexts[index].truncate(slot, 0)
            self._cached[index][slot].clear()
            self._exact[index][slot] = 0

    def _free(self, slot: int) -> None:
        state, self._slots[slot] = self._slots[slot], None
        if state is not None and state.chain is not None:
            state.chain.close()
        self._clock += 1
        self._last_used[slot] = self._clock

    def close(self) -> None:
        for slot in range(self.n_slots):
            self._free(slot)
        for index in reversed(range(len(self._contexts))):
            self._close(index)

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
