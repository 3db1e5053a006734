"""GuidedModel: the Python API desktop apps embed. Every method is a thin layer over engine.Engine.steps.

Thread safety: one GuidedModel may be shared by several threads; calls are serialized by a lock (a ``stream``
holds it from its first piece until it is exhausted or closed). A thread that starts another call while its own
stream is still open gets an error instead of a deadlock.

Hyperparameters from the paper's reference code: it mixes (base + α·arm)/(1+α) and samples at temperature
T/(1+α). Dividing the mixed logits by 1+α and the temperature by the same 1+α cancel, so sampling is the same as
ours, log p ∝ (log p_base + α·log p_arm)/T, with the *same* α and T: published settings carry over unchanged.
Only the distribution before temperature differs (it is tempered by 1/(1+α)); pass ``normalized=True`` to get the
paper's form in ``next_token_logprobs`` and in reported logprobs.
"""

from __future__ import annotations

import codecs
import dataclasses
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .batching import batch_steps
from .chat_template import Message, resolve_template
from .config import ArmSpec, LoadConfig, SamplingConfig, arm_specs
from .engine import Cancel, Engine, Timings
from .errors import InvalidOptionError

Prompt = str | Sequence[int]


@dataclass(frozen=True)
class ChatPrompt:
    tokens: list[int]
    stop_at_turns: bool  # the template has no end-of-turn token: stop where the next speaker's label starts

    def sampling(self, options: Mapping[str, object]) -> dict:
        """``options`` with the template's own end-of-reply rule added."""
        return dict(options, stop_at_turns=True) if self.stop_at_turns else dict(options)


@dataclass
class GenerationResult:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "eos" or "cancelled"
    timings: Timings = field(default_factory=Timings)
    logprobs: list[float] | None = None  # per generated token, under the mixed distribution (on request)
    top_logprobs: list[dict[int, float]] | None = None


# A new line that opens with a speaker's label ("User:", "Assistant:", "Student:", "Dr Smith:"): in a plain
# transcript the reply is over, whoever the model lets speak next. A tail that may still become one is held back.
TURN_LABEL = re.compile(r"\n[ \t]*[A-Z][\w'-]{0,24}(?: [A-Z][\w'-]{0,24})?:")
MAYBE_TURN_LABEL = re.compile(r"\n[ \t]*(?:[A-Z][\w'-]{0,24}(?: (?:[A-Z][\w'-]{0,24})?)?)?$")


class _StopText:
    """Turns tokens into text pieces: holds back bytes of a split UTF-8 character and any tail that could be the
    start of a stop string (or, with ``turn_labels``, of a speaker's label on a new line), so a stop spanning
    several tokens is caught and never emitted."""

    def __init__(self, token_bytes, stops: Sequence[str], turn_labels: bool = False):
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = stops
        self._turn_labels = turn_labels
        self._pending = ""

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (text safe to emit now, whether a stop string was reached)."""
        self._pending += self._decoder.decode(self._token_bytes(token))
        hits = [i for i in (self._pending.find(stop) for stop in self._stops) if i >= 0]
        if self._turn_labels and (label := TURN_LABEL.search(self._pending)):
            hits.append(label.start())
        if hits:
            piece, self._pending = self._pending[: min(hits)], ""
            return piece, True
        hold = max(
            (k for stop in self._stops for k in range(1, len(stop)) if self._pending.endswith(stop[:k])), default=0
        )
        if self._turn_labels and (label := MAYBE_TURN_LABEL.search(self._pending)):
            hold = max(hold, len(self._pending) - label.start())
        cut = len(self._pending) - hold
        piece, self._pending = self._pending[:cut], self._pending[cut:]
        return piece, False

    def flush(self) -> str:
        piece, self._pending = self._pending + self._decoder.decode(b"", final=True), ""
        return piece


class GuidedModel:
    """A base GGUF model guided by ARMs: ``GuidedModel(base, arms={path_or_name: alpha, ...}, n_ctx=...)``.

    ``base`` None is the embedded Gemma-3-270M. ARMs are full GGUF models sharing the base's vocabulary or GGUF
    LoRA adapters of the base, given as {path or shipped name: α} (α None: the ARM's recommended weight) or as
    ArmSpecs. Keyword options are LoadConfig's fields (n_ctx, n_gpu_layers, n_threads, kv_cache_type, flash_attn,
    concurrent, chat_template); or pass a whole ``config``. ``weights`` in any call overrides α per ARM (by name,
    path or file stem) without reloading; α = 0 skips that ARM's decode entirely. ``seed`` is the default for calls
    that pass none.
    """

    def __init__(
        self,
        base: str | os.PathLike | None = None,
        arms: Mapping[str | os.PathLike, float | None] | Sequence[ArmSpec | str] | None = None,
        *,
        seed: int | None = None,
        config: LoadConfig | None = None,
        **load_options,
    ):
        if config is None:
            known = {f.name for f in dataclasses.fields(LoadConfig)} - {"base", "arms"}
            unknown = sorted(set(load_options) - known)
            if unknown:
                raise InvalidOptionError(
                    f"unknown load option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
                )
            config = LoadConfig(base=None if base is None else str(base), arms=arm_specs(arms), **load_options)
        elif base is not None or arms is not None or load_options:
            raise InvalidOptionError("give either config=LoadConfig(...) or base, arms and load options, not both")
        self.config = config
        self._engine = Engine(config)
        try:
            self.chat_template = resolve_template(config.chat_template, self._engine.base_model)
        except BaseException:
            self._engine.close()
            raise
        self.seed = seed
        self.last_result: GenerationResult | None = None
        self._lock = threading.Lock()
        self._owner: int | None = None

    @property
    def arms(self) -> list[ArmSpec]:
        return [arm.spec for arm in self.engine.arms]

    def arm_weights(self, weights: Mapping[str, float] | None = None) -> dict[str, float]:
        """Every ARM's α by name for a call with ``weights``: its default, overridden (unknown names refused)."""
        return dict(zip((arm.name for arm in self.engine.arms), self.engine.alphas(weights), strict=True))

    # ---- plumbing ------------------------------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise InvalidOptionError("this GuidedModel is closed")
        return self._engine

    def _acquire(self) -> None:
        if self._owner == threading.get_ident():
            raise InvalidOptionError("this thread still has an open stream on the model; exhaust or close it first")
        self._lock.acquire()
        self._owner = threading.get_ident()

    def _release(self) -> None:
        self._owner = None
        self._lock.release()

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.engine.base_model.tokenize(text, add_special=add_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.engine.base_model.detokenize(tokens)

    def _prompt_tokens(self, prompt: Prompt) -> list[int]:
        return self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

    # ---- generation ----------------------------------------------------------------------------------------------

    def _pieces(
        self, prompt: Prompt, weights, cancel: Cancel, options: dict, result: GenerationResult
    ) -> Iterator[str]:
        """The one text loop: engine steps → text pieces, filling ``result`` as it goes."""
        self._acquire()
        try:
            engine = self.engine
            config = SamplingConfig.from_options(options, seed=self.seed)
            if config.logprobs is not None:
                result.logprobs, result.top_logprobs = [], []
            text = _StopText(engine.base_model.token_bytes, config.stop, config.stop_at_turns)
            steps = engine.steps(self._prompt_tokens(prompt), config, weights, cancel, result.timings)
            stopped = False
            try:
                for step in steps:
                    result.finish_reason = step.finish_reason
                    if step.token is None or step.finish_reason == "eos":
                        break
                    result.tokens.append(step.token)
                    if result.logprobs is not None:
                        result.logprobs.append(step.logprob)
                        result.top_logprobs.append(step.top_logprobs)
                    piece, stopped = text.push(step.token)
                    if piece:
                        result.text += piece
                        yield piece
                    if stopped:
                        result.finish_reason = "stop"
                        break
            finally:
                steps.close()
            if not stopped:
                tail = text.flush()
                if tail:
                    result.text += tail
                    yield tail
            self.last_result = result
        finally:
            self._release()

    def generate(self, prompt: Prompt, *, weights=None, cancel: Cancel = None, **sampling) -> GenerationResult:
        """Generate a completion of ``prompt`` (text, or token ids) with the sampling options of SamplingConfig."""
        result = GenerationResult()
        for _ in self._pieces(prompt, weights, cancel, sampling, result):
            pass
        return result

    def stream(self, prompt: Prompt, *, weights=None, cancel: Cancel = None, **sampling) -> Iterator[str]:
        """Yield the completion as text pieces (whole UTF-8 characters, stop strings left out); afterwards
        ``last_result`` holds the full result."""
        return self._pieces(prompt, weights, cancel, sampling, GenerationResult())

    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        *,
        weights=None,
        cancel: Cancel = None,
        seeds: Sequence[int | None] | None = None,
        **sampling,
    ) -> list[GenerationResult]:
        """Generate completions of several prompts at once (one multi-sequence batch per step; sequence i samples
        with ``seeds[i]``, by default seed + i). For the batch runner: much higher throughput than one prompt after
        another. Logprobs are not reported here."""
        self._acquire()
        try:
            engine = self.engine
            config = SamplingConfig.from_options(sampling, seed=self.seed)
            results = [GenerationResult() for _ in prompts]
            texts = [_StopText(engine.base_model.token_bytes, config.stop, config.stop_at_turns) for _ in prompts]
            finished: set[int] = set()
            prompt_tokens = [self._prompt_tokens(p) for p in prompts]
            steps = batch_steps(engine, prompt_tokens, config, weights, cancel, finished, seeds)
            try:
                for seq, step in steps:
                    result = results[seq]
                    result.finish_reason = step.finish_reason
                    if step.token is None or step.finish_reason == "eos":
                        continue
                    result.tokens.append(step.token)
                    piece, stopped = texts[seq].push(step.token)
                    result.text += piece
                    if stopped:
                        result.finish_reason = "stop"
                        finished.add(seq)
            finally:
                steps.close()
            for result, text in zip(results, texts, strict=True):
                if result.finish_reason != "stop":
                    result.text += text.flush()
            return results
        finally:
            self._release()

    def chat(
        self, messages: Sequence[Message], *, weights=None, cancel: Cancel = None, stream: bool = False, **sampling
    ) -> GenerationResult | Iterator[str]:
        """Reply to ``messages`` ([{"role": ..., "content": ...}, ...]) rendered with the chat template (see
        chat_template.py). Each context keeps its KV cache between turns, so a new turn decodes only the tokens
        after the common prefix with the previous one, not the whole history."""
        prompt = self.chat_prompt(messages)
        run = self.stream if stream else self.generate
        return run(prompt.tokens, weights=weights, cancel=cancel, **prompt.sampling(sampling))

    def check_chat_template(self) -> None:
        """Render a short conversation once, so that a broken or hostile template fails now (ChatTemplateError),
        not in the middle of a session."""
        from .chat_template import PROBE

        self.chat_template.render(self.engine.base_model, PROBE)

    def chat_prompt(self, messages: Sequence[Message]) -> ChatPrompt:
        """``messages`` rendered with the chat template, as token ids ready for the assistant's reply, and the
        strings that end the reply where the template has no end-of-turn token (the plain transcript's next turn)."""
        rendered = self.chat_template.render(self.engine.base_model, messages)
        tokens = self.engine.base_model.tokenize(rendered.text, add_special=rendered.add_bos, parse_special=True)
        return ChatPrompt(tokens, rendered.stop_at_turns)

    def next_token_logprobs(
        self,
        tokens: Prompt,
        weights: Mapping[str, float] | None = None,
        normalized: bool = False,
        guard_min_p: float = 0.0,
    ) -> np.ndarray:
        """log p(next token | tokens) under the guided mixture, before temperature (float32, n_vocab); masked
        tokens (``guard_min_p``, see SamplingConfig) are -inf."""
        self._acquire()
        try:
            return self.engine.mixed_logprobs(self._prompt_tokens(tokens), weights, normalized, guard_min_p)
        finally:
            self._release()

    # ---- lifetime ------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Free contexts, adapters and models (in reverse order of loading)."""
        with self._lock:
            if self._engine is not None:
                self._engine.close()
                self._engine = None

    def __enter__(self) -> GuidedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
