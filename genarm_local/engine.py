"""The guided stepping loop: a base model and its ARMs decoded together, one token at a time.

One story, in the order of llama.cpp's examples/simple: load the base and every ARM → check vocabularies →
contexts → (per call) prefill → sampler chain → loop { mix ARM log-probs into the base's logits row; sample;
decode the token in every context } → free in reverse order. generate, stream, chat and next_token_logprobs in
api.py are thin layers over ``Engine.steps`` and ``Engine.mixed_logprobs``.

An ARM is a full GGUF model (any size, same vocabulary: weak-to-strong guidance) or a GGUF LoRA adapter
(general.type = "adapter"), which becomes a second context over the base's own loaded model with the adapter set on
that context only, so the weights are in memory once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import llama_cpp as lc
import numpy as np

from .errors import (
    AdapterMismatchError,
    ContextOverflowError,
    CorruptModelError,
    InvalidOptionError,
    NotACheckpointError,
    VocabularyMismatchError,
)
from .mixing import mix_logprobs
from .native import Adapter, Batch, Context, Model, gguf_header
from .sampling import SamplerChain, SamplingConfig

Cancel = Callable[[], bool] | threading.Event | None
T = TypeVar("T")


@dataclass
class Arm:
    """One ARM: its name (the key it was given under), default weight α, and the context it decodes in."""

    name: str
    alpha: float
    context: Context
    adapter: Adapter | None  # a LoRA ARM: its context is over the base's model with this adapter set


@dataclass
class Step:
    """One sampled token; ``finish_reason`` is set on the last step ("eos", "length" or "cancelled")."""

    token: int | None
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None


@dataclass
class Timings:
    prompt_tokens: int = 0
    prompt_decoded: int = 0  # tokens actually decoded in the base context (the rest came from the KV cache)
    prompt_s: float = 0.0
    generated_tokens: int = 0
    generation_s: float = 0.0
    per_context_decoded: list[int] = field(default_factory=list)

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_decoded / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def generated_tokens_per_s(self) -> float:
        return self.generated_tokens / self.generation_s if self.generation_s > 0 else 0.0


def check_same_vocabulary(base: Model, arm: Model) -> None:
    """Refuse an ARM whose token table differs from the base's on the base's ids (extra ARM padding is fine)."""
    for token in range(base.n_vocab):
        base_text = lc.llama_vocab_get_text(base.vocab, token)
        arm_text = lc.llama_vocab_get_text(arm.vocab, token) if token < arm.n_vocab else None
        if base_text != arm_text:
            shown = lambda text: "(no such token)" if text is None else repr(text.decode("utf-8", "replace"))  # noqa: E731
            raise VocabularyMismatchError(
                f"{arm.path} does not share the vocabulary of {base.path}: token {token} is {shown(base_text)} in the "
                f"base but {shown(arm_text)} in the ARM; an ARM must be built on the base's tokenizer"
            )


def _is_set(cancel: Cancel) -> bool:
    if cancel is None:
        return False
    return cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())


class Engine:
    """Loaded base + ARMs with one context each. Not thread-safe by itself: GuidedModel serializes calls."""

    def __init__(
        self,
        base: str | os.PathLike,
        arms: Mapping[str | os.PathLike, float] | None = None,
        *,
        n_ctx: int = 2048,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        kv_cache_type: str = "f16",
        flash_attn: bool | None = None,
        concurrent: bool | None = None,
    ):
        self.n_threads = n_threads or max(1, os.cpu_count() or 1)
        # Concurrent: each active context decodes on its own thread with its share of the cores (llama_decode
        # releases the GIL). None decides per call: on the CPU, when every context gets at least one core -- a
        # small model's decode scales sublinearly across threads, so side by side on a share each is a little
        # faster than one after the other on all (1.05x on 2 cores; bench/bench_engine.py measures it).
        self.concurrent = concurrent
        self.n_gpu_layers = n_gpu_layers
        self._pool: ThreadPoolExecutor | None = None
        self._context_options = context_options = dict(
            n_ctx=n_ctx, n_threads=self.n_threads, kv_cache_type=kv_cache_type, flash_attn=flash_attn
        )
        # Everything loaded so far is freed, in reverse order, if a later step fails: nothing half-loaded remains.
        with contextlib.ExitStack() as stack:
            if gguf_header(base)["type"] == "adapter":
                raise NotACheckpointError(f"{base} is a LoRA adapter, not a model: give it as an ARM of its base")
            self.base_model = stack.enter_context(Model(base, n_gpu_layers=n_gpu_layers))
            self.base = stack.enter_context(Context(self.base_model, **context_options))
            self.n_vocab = self.base_model.n_vocab
            self.arms: list[Arm] = []
            for name, alpha in (arms or {}).items():
                header = gguf_header(name)
                if header["type"] == "adapter":
                    adapter = stack.enter_context(self._load_adapter(name, header["architecture"]))
                    adapted = Context(self.base_model, adapters=[(adapter, 1.0)], **context_options)
                    context = stack.enter_context(adapted)
                else:
                    adapter = None
                    model = stack.enter_context(Model(name, n_gpu_layers=n_gpu_layers))
                    check_same_vocabulary(self.base_model, model)
                    context = stack.enter_context(Context(model, **context_options))
                self.arms.append(Arm(str(name), float(alpha), context, adapter))
            self._resources = stack.pop_all()
        self.n_ctx = self.base.n_ctx

    def _load_adapter(self, path: str | os.PathLike, architecture: str) -> Adapter:
        base_architecture = self.base_model.meta("general.architecture")
        if architecture != base_architecture:
            raise AdapterMismatchError(
                f"{path} is a LoRA adapter for architecture {architecture!r} but the base {self.base_model.path} is "
                f"{base_architecture!r}; export the adapter against this base"
            )
        try:
            return Adapter(self.base_model, path)
        except CorruptModelError as exc:
            raise AdapterMismatchError(f"{exc}; was the adapter trained on this base?") from exc

    # ---- weights -------------------------------------------------------------------------------------------------

    def alphas(self, weights: Mapping[str, float] | None = None) -> list[float]:
        """Each ARM's α for one call: its default, overridden by ``weights`` (keyed by ARM name or file stem)."""
        alphas = {arm.name: arm.alpha for arm in self.arms}
        stems = {Path(arm.name).stem: arm.name for arm in self.arms}
        for key, alpha in (weights or {}).items():
            name = str(key) if str(key) in alphas else stems.get(str(key))
            if name is None:
                known = ", ".join(alphas) or "none"
                raise InvalidOptionError(f"weights name an unknown ARM {key!r}; ARMs: {known}")
            alphas[name] = float(alpha)
        return [alphas[arm.name] for arm in self.arms]

    def _active(self, alphas: Sequence[float]) -> list[tuple[Arm, float]]:
        """ARMs with α ≠ 0; the others are not decoded at all."""
        return [(arm, alpha) for arm, alpha in zip(self.arms, alphas, strict=True) if alpha != 0.0]

    # ---- the mixing ----------------------------------------------------------------------------------------------

    def _mix(
        self,
        active: Sequence[tuple[Arm, float]],
        normalized: bool,
        dst: np.ndarray | None = None,
        contexts: Sequence[Context] | None = None,
        row: int = -1,
    ) -> None:
        """Write log p = w0·log_softmax(base) + Σ α_i·log_softmax(arm_i) − log Z (DESIGN.md) into ``dst``, by
        default the base's own logits row (in place, where the sampler chain reads it).

        ``contexts`` (base first, then one per active ARM) default to the loaded ones; ``row`` picks a sequence's
        row after a multi-sequence decode. ``normalized`` is the paper code's form (base + Σα_i·arm_i)/(1 + Σα_i):
        every weight divided by 1 + Σα_i.
        """
        base, *arms = contexts or [self.base, *(arm.context for arm, _ in active)]
        scale = 1.0 / self._normalizer([alpha for _, alpha in active]) if normalized else 1.0
        base_row = base.logits_address(row)
        mix_logprobs(
            base_row if dst is None else dst,
            base_row,
            [arm.logits_address(row) for arm in arms],
            [alpha * scale for _, alpha in active],
            base_weight=scale,
            n_vocab=self.n_vocab,
            n_threads=self.n_threads,
        )

    @staticmethod
    def _normalizer(alphas: Sequence[float]) -> float:
        total = 1.0 + sum(alphas)
        if total <= 0.0:
            raise InvalidOptionError(f"normalized mixing needs 1 + Σα > 0, got {total:g}")
        return total

    def _prefill(self, tokens: Sequence[int], contexts: Sequence[Context]) -> list[int]:
        if len(tokens) > self.n_ctx:
            raise ContextOverflowError(f"the prompt has {len(tokens)} tokens but the context holds {self.n_ctx}")
        return self._each(contexts, lambda context: context.sync(tokens))

    def mixed_logprobs(self, tokens: Sequence[int], weights=None, normalized: bool = False) -> np.ndarray:
        """The guided next-token log-probabilities after ``tokens`` (before temperature), as a new array."""
        active = self._active(self.alphas(weights))
        contexts = [self.base] + [arm.context for arm, _ in active]
        with self._thread_shares(contexts):
            self._prefill(tokens, contexts)
        out = np.empty(self.n_vocab, dtype=np.float32)
        self._mix(active, normalized, dst=out)
        return out

    # ---- the stepping loop ---------------------------------------------------------------------------------------

    def steps(
        self,
        prompt: Sequence[int],
        config: SamplingConfig,
        weights: Mapping[str, float] | None = None,
        cancel: Cancel = None,
        timings: Timings | None = None,
    ) -> Iterator[Step]:
        """Generate from ``prompt`` token by token; the last Step carries the finish reason (a stop string is the
        caller's business: it closes this generator)."""
        timings = timings if timings is not None else Timings()
        alphas = self.alphas(weights)
        if len(prompt) + config.max_tokens > self.n_ctx:
            raise ContextOverflowError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({config.max_tokens}) exceed the context of {self.n_ctx} "
                "tokens; shorten the prompt, lower max_tokens or load with a larger n_ctx"
            )
        active = self._active(alphas)
        contexts = [self.base] + [arm.context for arm, _ in active]
        # With no ARM active the row is left as llama.cpp produced it: plain llama.cpp sampling, bit for bit.
        guided = bool(active) or config.normalized
        temperature_scale = self._normalizer([a for _, a in active]) if config.normalized else 1.0
        scratch = np.empty(self.n_vocab, dtype=np.float32) if not guided and config.logprobs is not None else None

        with SamplerChain(config, self.base_model, temperature_scale) as chain, self._thread_shares(contexts):
            # 1. Prefill every active context; only tokens after the cached common prefix are decoded.
            start = time.perf_counter()
            timings.per_context_decoded = self._prefill(prompt, contexts)
            timings.prompt_tokens, timings.prompt_decoded = len(prompt), timings.per_context_decoded[0]
            timings.prompt_s = time.perf_counter() - start
            start = time.perf_counter()
            for index in range(config.max_tokens):
                if _is_set(cancel):
                    yield Step(None, finish_reason="cancelled")
                    return
                # 2. Mix the ARMs' log-probs into the base's logits row, in place.
                if guided:
                    self._mix(active, config.normalized, contexts=contexts)
                # 3. Sample from that row with llama.cpp's chain (which also accepts the token).
                token = chain.sample(self.base)
                step = Step(token)
                if config.logprobs is not None:
                    step.logprob, step.top_logprobs = self._read_logprobs(token, config.logprobs, scratch)
                timings.generated_tokens = index + 1
                timings.generation_s = time.perf_counter() - start
                if self.base_model.is_eog(token):
                    step.finish_reason = "eos"
                    yield step
                    return
                if index + 1 == config.max_tokens:
                    step.finish_reason = "length"
                    yield step
                    return
                yield step
                # 4. Feed the token to every active context.
                self._each(contexts, lambda context, token=token: context.decode_one(token))

    def batch_steps(
        self,
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
        active = self._active(self.alphas(weights))
        n_seq = len(prompts)
        if n_seq == 0 or any(len(prompt) == 0 for prompt in prompts):
            raise InvalidOptionError("generate_batch needs at least one prompt, and no empty prompt")
        per_sequence = max(len(prompt) for prompt in prompts) + config.max_tokens
        if per_sequence > self.n_ctx:
            raise ContextOverflowError(
                f"the longest prompt + max_tokens ({per_sequence} tokens) exceed the context of {self.n_ctx} tokens"
            )
        temperature_scale = self._normalizer([a for _, a in active]) if config.normalized else 1.0
        if seeds is None:
            seeds = [None if config.seed is None else config.seed + index for index in range(n_seq)]
        elif len(seeds) != n_seq:
            raise InvalidOptionError(f"{len(seeds)} seeds for {n_seq} prompts: give one seed per prompt")
        with contextlib.ExitStack() as stack:
            options = dict(self._context_options, n_ctx=per_sequence * n_seq, n_seq_max=n_seq)
            base = stack.enter_context(Context(self.base_model, **options))
            arms = [
                stack.enter_context(
                    Context(self.base_model, adapters=[(arm.adapter, 1.0)], **options)
                    if arm.adapter
                    else Context(arm.context.model, **options)
                )
                for arm, _ in active
            ]
            contexts = [base, *arms]
            guided = bool(active) or config.normalized  # as in steps: unguided rows stay plain llama.cpp
            chains = [
                stack.enter_context(
                    SamplerChain(dataclasses.replace(config, seed=seed), self.base_model, temperature_scale)
                )
                for seed in seeds
            ]
            batch = stack.enter_context(Batch(max(n_seq, self.base.n_batch)))
            stack.enter_context(self._thread_shares(contexts))
            # 1. Prefill every prompt but its last token, the sequences packed together into full batches.
            prefill = [(prompt[pos], pos, seq) for seq, prompt in enumerate(prompts) for pos in range(len(prompt) - 1)]
            for start in range(0, len(prefill), batch.capacity):
                batch.clear()
                for token, pos, seq in prefill[start : start + batch.capacity]:
                    batch.add(token, pos, seq, False)
                self._each(contexts, lambda context: context.decode_batch(batch))
            pending = {seq: (prompt[-1], len(prompt) - 1) for seq, prompt in enumerate(prompts)}
            for index in range(config.max_tokens):
                running = [seq for seq in sorted(pending) if seq not in finished]
                if not running:
                    return
                if _is_set(cancel):
                    for seq in running:
                        yield seq, Step(None, finish_reason="cancelled")
                    return
                # 2. One batch holding every running sequence's newest token, decoded in every context.
                batch.clear()
                for seq in running:
                    token, pos = pending[seq]
                    batch.add(token, pos, seq, True)
                self._each(contexts, lambda context: context.decode_batch(batch))
                for row, seq in enumerate(running):
                    # 3. Mix and sample each sequence's row.
                    if guided:
                        self._mix(active, config.normalized, contexts=contexts, row=row)
                    token = chains[seq].sample(base, row)
                    step = Step(token)
                    if self.base_model.is_eog(token):
                        step.finish_reason = "eos"
                    elif index + 1 == config.max_tokens:
                        step.finish_reason = "length"
                    if step.finish_reason:
                        del pending[seq]
                    else:
                        pending[seq] = (token, pending[seq][1] + 1)
                    yield seq, step

    def _concurrent(self, contexts: Sequence[Context]) -> bool:
        if len(contexts) < 2:
            return False
        if self.concurrent is not None:
            return self.concurrent
        return self.n_gpu_layers == 0 and len(contexts) <= self.n_threads

    def _each(self, contexts: Sequence[Context], work: Callable[[Context], T]) -> list[T]:
        """``work(context)`` for every context: one after the other, or concurrently on the pool's threads."""
        if not self._concurrent(contexts):
            return [work(context) for context in contexts]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.arms)), thread_name_prefix="genarm-decode")
        others = [self._pool.submit(work, context) for context in contexts[1:]]
        first = work(contexts[0])
        return [first, *(future.result() for future in others)]

    @contextlib.contextmanager
    def _thread_shares(self, contexts: Sequence[Context]) -> Iterator[None]:
        """While decoding concurrently, the contexts split the cores instead of each using all of them."""
        if not self._concurrent(contexts):
            yield
            return
        share = max(1, self.n_threads // len(contexts))
        for context in contexts:
            context.set_threads(share, share)
        try:
            yield
        finally:
            for context in contexts:
                context.set_threads(self.n_threads, self.n_threads)

    def _read_logprobs(self, token: int, top_n: int, scratch: np.ndarray | None) -> tuple[float, dict[int, float]]:
        """The sampled token's mixed log-prob and the top-n alternatives, read from the mixed row."""
        if scratch is not None:  # unguided: the row holds raw logits, normalise a copy
            self._mix([], False, dst=scratch)
            row = scratch
        else:
            row = np.ctypeslib.as_array(lc.llama_get_logits_ith(self.base.ptr, -1), shape=(self.n_vocab,))
        top: dict[int, float] = {}
        if top_n:
            best = np.argpartition(row, -top_n)[-top_n:]
            top = {int(t): float(row[t]) for t in best[np.argsort(row[best])[::-1]]}
        return float(row[token]), top

    def close(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown()
            self._pool = None
        resources, self._resources = getattr(self, "_resources", None), None
        if resources is not None:
            resources.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
