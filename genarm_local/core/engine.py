"""The guided stepping loop: a base model and its ARMs decoded together, one token at a time.

One story, in the order of llama.cpp's examples/simple: load the base and every ARM → check vocabularies →
contexts → (per call) prefill → sampler chain → loop { mix ARM log-probs into the base's logits row; sample;
decode the token in every context } → free in reverse order. generate, stream, chat and next_token_logprobs in
api.py are thin layers over ``Engine.steps`` and ``Engine.mixed_logprobs``. Only native.py talks to llama.cpp.

An ARM is a full GGUF model (any size, same vocabulary: weak-to-strong guidance) or a GGUF LoRA adapter
(general.type = "adapter"), which becomes a second context over the base's own loaded model with the adapter set on
that context only, so the weights are in memory once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from .arm_metadata import Calibration, read_calibration
from .config import ArmSpec, LoadConfig, SamplingConfig, find_arm
from .context import Context
from .decode_times import DecodeTimes
from .errors import (
    AdapterMismatchError,
    ContextOverflowError,
    CorruptModelError,
    InvalidOptionError,
    NotACheckpointError,
    VocabularyMismatchError,
)
from .mixing import mix_logprobs
from .native import Adapter, Model, block_signals, gguf_header
from .sampling import SamplerChain

Cancel = Callable[[], bool] | threading.Event | None
T = TypeVar("T")


@dataclass
class Arm:
    """One loaded ARM: what was asked for, its default weight α, and the context it decodes in."""

    spec: ArmSpec
    alpha: float  # None when constructed: the recommended α
    context: Context
    adapter: Adapter | None  # a LoRA ARM: its context is over the base's model with this adapter set
    calibration: Calibration | None = None  # the ARM file's own (genarm.calibration.* metadata)

    def __post_init__(self) -> None:
        if self.alpha is None:  # given without a weight
            self.alpha = self.recommended_alpha

    @property
    def recommended_alpha(self) -> float:
        """The α this ARM runs at when given without a weight: its calibration's, or the paper's 1."""
        return self.calibration.recommended_alpha if self.calibration is not None else 1.0

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class Step:
    """One sampled token; ``finish_reason`` is set on the last step ("eos", "length", "cancelled", or "error" when
    the scheduler failed that sequence)."""

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
        base_text, arm_text = base.token_raw_text(token), arm.token_raw_text(token)
        if base_text != arm_text:
            shown = lambda text: "(no such token)" if text is None else repr(text.decode("utf-8", "replace"))  # noqa: E731
            raise VocabularyMismatchError(
                f"{arm.path} does not share the vocabulary of {base.path}: token {token} is {shown(base_text)} in the "
                f"base but {shown(arm_text)} in the ARM; an ARM must be built on the base's tokenizer"
            )


def is_set(cancel: Cancel) -> bool:
    if cancel is None:
        return False
    return cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())


class Engine:
    """Loaded base + ARMs with one context each. Not thread-safe by itself: GuidedModel serializes calls."""

    def __init__(self, config: LoadConfig):
        self.config = config
        self.n_threads = config.threads
        # Concurrent: each active context decodes on its own thread with its share of the cores (llama_decode
        # releases the GIL). None decides per call: on the CPU, when every context gets at least one core -- a
        # small model's decode scales sublinearly across threads, so side by side on a share each is a little
        # faster than one after the other on all (1.05x on 2 cores; bench/bench_engine.py measures it).
        self.concurrent = config.concurrent
        self._pool: ThreadPoolExecutor | None = None
        self.decode_times = DecodeTimes()  # step times measured by the schedulers over this engine (decode_times.py)
        base = config.base_path()
        # Everything loaded so far is freed, in reverse order, if a later step fails: nothing half-loaded remains.
        with contextlib.ExitStack() as stack:
            if gguf_header(base)["type"] == "adapter":
                raise NotACheckpointError(f"{base} is a LoRA adapter, not a model: give it as an ARM of its base")
            self.base_model = stack.enter_context(Model(base, config))
            self.base = stack.enter_context(Context(self.base_model, config))
            self.n_vocab = self.base_model.n_vocab
            self.arms: list[Arm] = []
            for spec in config.arms:
                header = gguf_header(spec.path)
                if header["type"] == "adapter":
                    adapter = stack.enter_context(self._load_adapter(spec.path, header["architecture"]))
                    context = stack.enter_context(Context(self.base_model, config, adapters=[(adapter, 1.0)]))
                else:
                    adapter = None
                    model = stack.enter_context(Model(spec.path, config))
                    check_same_vocabulary(self.base_model, model)
                    context = stack.enter_context(Context(model, config))
                # An ARM given without a weight runs at the α its calibration recommends: the same strength (KL
                # budget) for every ARM, whatever scale its training left it at; uncalibrated, the paper's α = 1.
                self.arms.append(Arm(spec, spec.alpha, context, adapter, read_calibration(spec.path)))
            self._resources = stack.pop_all()
        self.n_ctx = self.base.n_ctx

    def _load_adapter(self, path: Path, architecture: str) -> Adapter:
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

    def alphas(self, weights: Mapping[str, float | None] | None = None) -> list[float]:
        """Each ARM's α for one call: its default, overridden by ``weights`` (keyed as ArmSpec.matches says; a
        weight of None is the ARM's recommended α)."""
        alphas = [arm.alpha for arm in self.arms]
        specs = [arm.spec for arm in self.arms]
        for key, alpha in (weights or {}).items():
            index = find_arm(specs, key)
            alphas[index] = self.arms[index].recommended_alpha if alpha is None else float(alpha)
        return alphas

    def check_fits(self, n_prompt: int, max_tokens: int) -> None:
        """Refuse a request whose prompt plus max_tokens exceeds the context window."""
        if n_prompt + max_tokens > self.n_ctx:
            raise ContextOverflowError(
                f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceed the context of {self.n_ctx} tokens; "
                "shorten the prompt, lower max_tokens or load with a larger n_ctx (-c)"
            )

    def active_arms(self, alphas: Sequence[float]) -> list[tuple[Arm, float]]:
        """ARMs with α ≠ 0; the others are not decoded at all."""
        return [(arm, alpha) for arm, alpha in zip(self.arms, alphas, strict=True) if alpha != 0.0]

    # ---- the mixing ----------------------------------------------------------------------------------------------

    def mix(
        self,
        active: Sequence[tuple[Arm, float]],
        normalized: bool,
        dst: np.ndarray | None = None,
        contexts: Sequence[Context] | None = None,
        rows: Sequence[int] | None = None,
        guard_min_p: float = 0.0,
    ) -> None:
        """Write log p = w0·log_softmax(base) + Σ α_i·log_softmax(arm_i) − log Z (mixing.py) into ``dst``, by
        default the base's own logits row (in place, where the sampler chain reads it).

        ``contexts`` (base first, then one per active ARM) default to the loaded ones; ``rows`` (one per context,
        default the last) pick a sequence's row in each after a multi-sequence decode. ``normalized`` is the paper
        code's form (base + Σα_i·arm_i)/(1 + Σα_i): every weight divided by 1 + Σα_i. ``guard_min_p`` τ > 0 first
        masks the tokens the base finds implausible (p_base < τ · max p_base).
        """
        base, *arms = contexts or [self.base, *(arm.context for arm, _ in active)]
        base_row, *arm_rows = rows or [-1] * (1 + len(arms))
        scale = 1.0 / self.normalizer([alpha for _, alpha in active]) if normalized else 1.0
        base_address = base.logits_address(base_row)
        mix_logprobs(
            base_address if dst is None else dst,
            base_address,
            [arm.logits_address(row) for arm, row in zip(arms, arm_rows, strict=True)],
            [alpha * scale for _, alpha in active],
            base_weight=scale,
            n_vocab=self.n_vocab,
            n_threads=self.n_threads,
            guard_min_p=guard_min_p,
        )

    def temperature_scale(self, config: SamplingConfig, active: Sequence[tuple[Arm, float]]) -> float:
        """What the sampler chain divides T by for a row mixed as ``mix(active, config.normalized)`` writes it: the
        normalised row (its log-probs divided by 1 + Σα) needs T/(1+Σα) to sample the same distribution, and
        ``scale_temperature`` samples that distribution at T·max(1, 1+Σα) (SamplingConfig)."""
        alphas = [alpha for _, alpha in active]
        divisor = self.normalizer(alphas) if config.normalized else 1.0
        sharpness = max(1.0, 1.0 + sum(alphas)) if config.scale_temperature and active else 1.0
        return divisor / sharpness

    @staticmethod
    def normalizer(alphas: Sequence[float]) -> float:
        total = 1.0 + sum(alphas)
        if total <= 0.0:
            raise InvalidOptionError(f"normalized mixing needs 1 + Σα > 0, got {total:g}")
        return total

    def _prefill(self, tokens: Sequence[int], contexts: Sequence[Context]) -> list[int]:
        if len(tokens) > self.n_ctx:
            raise ContextOverflowError(f"the prompt has {len(tokens)} tokens but the context holds {self.n_ctx}")
        return self.each(contexts, lambda context: context.sync(tokens))

    def mixed_logprobs(
        self, tokens: Sequence[int], weights=None, normalized: bool = False, guard_min_p: float = 0.0
    ) -> np.ndarray:
        """The guided next-token log-probabilities after ``tokens`` (before temperature), as a new array."""
        active = self.active_arms(self.alphas(weights))
        contexts = [self.base] + [arm.context for arm, _ in active]
        with self.thread_shares(contexts):
            self._prefill(tokens, contexts)
        out = np.empty(self.n_vocab, dtype=np.float32)
        self.mix(active, normalized, dst=out, guard_min_p=guard_min_p if active else 0.0)
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
        self.check_fits(len(prompt), config.max_tokens)
        active = self.active_arms(alphas)
        contexts = [self.base] + [arm.context for arm, _ in active]
        # With no ARM active the row is left as llama.cpp produced it: plain llama.cpp sampling, bit for bit (the
        # guard, too, belongs to the guided distribution: α = 0 everywhere is the base's own output).
        guided = bool(active) or config.normalized
        guard = config.guard_min_p if active else 0.0
        temperature_scale = self.temperature_scale(config, active)
        scratch = np.empty(self.n_vocab, dtype=np.float32) if not guided and config.logprobs is not None else None

        with SamplerChain(config, self.base_model, temperature_scale) as chain, self.thread_shares(contexts):
            # 1. Prefill every active context; only tokens after the cached common prefix are decoded.
            start = time.perf_counter()
            timings.per_context_decoded = self._prefill(prompt, contexts)
            timings.prompt_tokens, timings.prompt_decoded = len(prompt), timings.per_context_decoded[0]
            timings.prompt_s = time.perf_counter() - start
            start = time.perf_counter()
            for index in range(config.max_tokens):
                if is_set(cancel):
                    yield Step(None, finish_reason="cancelled")
                    return
                # 2. Mix the ARMs' log-probs into the base's logits row, in place.
                if guided:
                    self.mix(active, config.normalized, contexts=contexts, guard_min_p=guard)
                # 3. Sample from that row with llama.cpp's chain (which also accepts the token).
                token = chain.sample(self.base)
                step = Step(token)
                if config.logprobs is not None:
                    step.logprob, step.top_logprobs = self.read_logprobs(token, config.logprobs, scratch)
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
                self.each(contexts, lambda context, token=token: context.decode_one(token))

    def _concurrent(self, contexts: Sequence[Context]) -> bool:
        if len(contexts) < 2:
            return False
        if self.concurrent is not None:
            return self.concurrent
        return self.config.n_gpu_layers == 0 and len(contexts) <= self.n_threads

    def each(self, contexts: Sequence[Context], work: Callable[[Context], T]) -> list[T]:
        """``work(context)`` for every context: one after the other, or concurrently on the pool's threads."""
        if not self._concurrent(contexts):
            return [work(context) for context in contexts]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=max(1, len(self.arms)), thread_name_prefix="genarm-decode", initializer=block_signals
            )
        others = [self._pool.submit(work, context) for context in contexts[1:]]
        first = work(contexts[0])
        return [first, *(future.result() for future in others)]

    @contextlib.contextmanager
    def thread_shares(self, contexts: Sequence[Context]) -> Iterator[None]:
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

    def read_logprobs(
        self, token: int, top_n: int, scratch: np.ndarray | None, context: Context | None = None, row: int = -1
    ) -> tuple[float, dict[int, float]]:
        """The sampled token's mixed log-prob and the top-n alternatives, read from the mixed row (``row`` of
        ``context``, by default the base's last). ``scratch`` is given when the row was not mixed (unguided)."""
        context = context or self.base
        if scratch is not None:  # unguided: the row holds raw logits, normalise a copy
            self.mix([], False, dst=scratch, contexts=[context], rows=[row])
            values = scratch
        else:
            values = context.logits_row(row)
        top: dict[int, float] = {}
        if top_n:
            best = np.argpartition(values, -top_n)[-top_n:]
            top = {int(t): float(values[t]) for t in best[np.argsort(values[best])[::-1]]}
        return float(values[token]), top

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
