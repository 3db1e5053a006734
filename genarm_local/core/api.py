"""GuidedModel: the Python API desktop apps embed. Every method submits jobs to the model's one decode loop
(engine.Engine, scheduler.Scheduler) and reads their events: generate, stream, chat, generate_batch and
next_token_logprobs are thin layers over it, like the batch runner and the server.

Threads: one GuidedModel may be shared by any number of threads; their generations share the loop's steps (one
multi-sequence batch, up to ``n_parallel`` at once; more wait for a free slot). ``close()`` never waits for more than
the step in progress: it ends every generation (their finish_reason is "cancelled"), from any thread, also with a
stream still open in the calling thread. A model dropped without ``close()`` is closed when it is garbage-collected.

Hyperparameters from the paper's reference code: it mixes (base + α·arm)/(1+α) and samples at temperature
T/(1+α), which is sampling base·arm^α at T with the same α and T: pass ``scale_temperature=False`` for published
settings (our default samples at T·(1+Σα⁺), see SamplingConfig) and ``normalized=True`` to get the paper's
form of the log-probs in ``next_token_logprobs`` and in reported logprobs.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .chat_template import Message, resolve_template
from .config import ArmSpec, LoadConfig, SamplingConfig, arm_specs
from .engine import Engine
from .errors import GenArmError, InvalidOptionError, ModelClosedError
from .scheduler import Event, Job, Timings

Prompt = str | Sequence[int]
Cancel = Callable[[], bool] | threading.Event | None


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
    finish_reason: str | None = None  # "stop" (end of generation or a stop string), "length" or "cancelled"
    timings: Timings = field(default_factory=Timings)
    logprobs: list[float] | None = None  # per generated token, under the guided distribution (on request)
    top_logprobs: list[dict[int, float]] | None = None
    error: GenArmError | None = None  # generate_many only: why this request failed (finish_reason "error")


@dataclass(frozen=True)
class GenerationResponse:
    """One step of a Stream, as mlx-lm's stream_generate yields them: the text that became final with it (whole
    UTF-8 characters, stop strings left out; "" while a character or a possible stop string is still incomplete),
    the token sampled, its log-prob under the guided distribution and the top alternatives (with ``logprobs=N``),
    and on the last response of a stream the finish reason ("stop", "length" or "cancelled") and the timings."""

    text: str
    token: int | None = None
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None
    timings: Timings | None = None


class Stream(Iterator[GenerationResponse]):
    """A generation in progress: iterating yields a GenerationResponse per step (``"".join(r.text for r in
    stream)`` is the text); ``result`` fills in as it goes and is complete when iteration ends; ``close()`` (or
    leaving a ``with`` block, or dropping the stream) cancels what is left. An error in the generation is raised by
    the iteration. Each stream has its own result: threads streaming at once never see each other's."""

    def __init__(self, model: GuidedModel, job: Job, poll: Callable[[], bool] | None = None):
        self._model = model  # the model lives as long as its streams
        self.job = job
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        job.on_event = self._events.put
        self._poll = poll
        self._done = False
        self.result = GenerationResult(timings=job.timings)
        if job.config.logprobs is not None:
            self.result.logprobs, self.result.top_logprobs = [], []

    def __next__(self) -> GenerationResponse:
        if self._done:
            raise StopIteration
        event = self._next_event()
        self._take(event)
        asked = self.result.logprobs is not None
        return GenerationResponse(
            text=event.text,
            token=event.token,
            logprob=event.logprob if asked else None,
            top_logprobs=event.top_logprobs if asked else None,
            finish_reason=event.finish_reason,
            timings=self.result.timings if event.finish_reason else None,
        )

    def _next_event(self) -> Event:
        try:
            if self._poll is None:
                return self._events.get()
            while True:
                if self._poll():
                    self.job.cancel.set()
                try:
                    return self._events.get(timeout=0.05)
                except queue.Empty:
                    pass
        except BaseException:  # Ctrl-C while waiting: nobody reads the rest
            self.close()
            raise

    def _take(self, event: Event) -> None:
        result = self.result
        if event.finish_reason is not None:
            self._done = True
            result.finish_reason = event.finish_reason
            if event.error is not None:
                result.error = event.error
                raise event.error
        if event.token is not None:
            result.tokens.append(event.token)
            if result.logprobs is not None:
                result.logprobs.append(event.logprob)
                result.top_logprobs.append(event.top_logprobs)
        result.text += event.text

    def close(self) -> None:
        if not self._done:
            self._done = True
            self.job.cancel.set()
            self.result.finish_reason = "cancelled"

    def drain(self) -> GenerationResult:
        """Read to the end; the complete result."""
        for _ in self:
            pass
        return self.result

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            self.job.cancel.set()


class GuidedModel:
    """A base GGUF model guided by ARMs: ``GuidedModel(base, arms={path_or_name: alpha, ...}, n_ctx=...)``.

    ``base`` None is the embedded Gemma-3-270M, and with it (``arms`` None) the shipped default ARMs
    (arms/defaults.json), as chat, batch and serve load them. ARMs are full GGUF models sharing the base's vocabulary
    or GGUF LoRA adapters of the base, given as {path or shipped name: α} (α None: the ARM's recommended weight) or
    as ArmSpecs; ``arms={}`` loads none. Keyword options are LoadConfig's fields (n_ctx, n_parallel, n_gpu_layers,
    n_threads, kv_cache_type, flash_attn, concurrent, chat_template); or pass a whole ``config``. ``weights`` in any
    call overrides α per ARM (by name, path or file stem) without reloading; α = 0 skips that ARM's decode entirely,
    and a negative α steers away from what the ARM prefers (it lowers the tokens the ARM rates above the base).
    ``seed`` is the default for calls that pass none.
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
            specs = None if arms is None else arm_specs(arms)
            config = LoadConfig(base=None if base is None else str(base), arms=specs, **load_options)
        elif base is not None or arms is not None or load_options:
            raise InvalidOptionError("give either config=LoadConfig(...) or base, arms and load options, not both")
        self.config = config
        self._engine = Engine(config)
        # Dropped without close(): the finalizer stops the engine thread and frees the native memory. It holds the
        # engine, which holds nothing of this object.
        self._finalizer = weakref.finalize(self, self._engine.close)
        try:
            self.chat_template = resolve_template(config.chat_template, self._engine.base_model)
        except BaseException:
            self.close()
            raise
        self.seed = seed

    @property
    def arms(self) -> list[ArmSpec]:
        return [arm.spec for arm in self.engine.arms]

    def load_arm(
        self, arm: str | os.PathLike | ArmSpec, alpha: float | None = None, name: str | None = None
    ) -> ArmSpec:
        """Load one more ARM into this running model (no restart; generations in progress go on, without it): a GGUF
        path or shipped name with its weight α (None: its recommended α) and name (default: the file's stem), or an
        ArmSpec. Calls made after it returns may weight it by name like the ARMs loaded at first. A name or file that
        is already loaded is refused (InvalidOptionError), as is a file that is no ARM of this base."""
        if isinstance(arm, ArmSpec):
            if alpha is not None or name is not None:
                raise InvalidOptionError("give alpha and name inside the ArmSpec, or a path with alpha and name")
            spec = arm
        else:
            spec = ArmSpec.of(arm, alpha, name)
        return self.engine.add_arm(spec).spec

    def arm_weights(self, weights: Mapping[str, float | None] | None = None) -> dict[str, float]:
        """Every ARM's α by name for a call with ``weights``: its default, overridden (unknown names refused)."""
        alphas = self.engine.alphas(weights)
        # ARMs only ever join at the end (load_arm): the first len(alphas) are the ones these weights are for
        return {arm.name: alpha for arm, alpha in zip(self.engine.arms, alphas, strict=False)}

    # ---- plumbing ------------------------------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        if self._engine.closed:
            raise ModelClosedError("this GuidedModel is closed")
        return self._engine

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.engine.base_model.tokenize(text, add_special=add_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.engine.base_model.detokenize(tokens)

    def _prompt_tokens(self, prompt: Prompt) -> list[int]:
        return self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

    def _job(self, tokens: list[int], config: SamplingConfig, weights, cancel: Cancel) -> tuple[Job, Callable | None]:
        job = Job(tokens, config, self.engine.alphas(weights))
        if isinstance(cancel, threading.Event):
            job.cancel = cancel
            return job, None
        return job, cancel

    # ---- generation ----------------------------------------------------------------------------------------------

    def stream(self, prompt: Prompt, *, weights=None, cancel: Cancel = None, **sampling) -> Stream:
        """Start generating a completion of ``prompt`` (text, or token ids) with the sampling options of
        SamplingConfig; iterate the Stream for GenerationResponses (text, token, log-probs; the finish reason and
        timings on the last), or read ``stream.result`` when it is done. ``cancel``: a threading.Event, or a
        function polled while waiting."""
        config = SamplingConfig.from_options(sampling, seed=self.seed)
        job, poll = self._job(self._prompt_tokens(prompt), config, weights, cancel)
        stream = Stream(self, job, poll)
        self.engine.submit([job])
        return stream

    def generate(self, prompt: Prompt, *, weights=None, cancel: Cancel = None, **sampling) -> GenerationResult:
        """Generate a completion of ``prompt`` (text, or token ids) with the sampling options of SamplingConfig."""
        return self.stream(prompt, weights=weights, cancel=cancel, **sampling).drain()

    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        *,
        weights=None,
        cancel: Cancel = None,
        seeds: Sequence[int | None] | None = None,
        **sampling,
    ) -> list[GenerationResult]:
        """Generate completions of several prompts at once: they join the decode loop together and share its steps
        (sequence i samples with ``seeds[i]``, by default seed + i). An error in any sequence is raised."""
        if not prompts:
            raise InvalidOptionError("generate_batch needs at least one prompt")
        config = SamplingConfig.from_options(sampling, seed=self.seed)
        if seeds is None:
            seeds = [None if config.seed is None else config.seed + index for index in range(len(prompts))]
        elif len(seeds) != len(prompts):
            raise InvalidOptionError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed per prompt")
        requests = [
            (self._prompt_tokens(prompt), dataclasses.replace(config, seed=seed), weights)
            for prompt, seed in zip(prompts, seeds, strict=True)
        ]
        streams = self._start(requests, cancel)
        try:
            return [stream.drain() for stream in streams]
        finally:
            for stream in streams:
                stream.close()

    def generate_many(self, requests: Sequence) -> list[GenerationResult]:
        """Requests with their own settings (each with ``tokens``, a SamplingConfig ``config`` and ``weights``, as
        core.requests.prepare makes them) generated together, as generate_batch does; a request that fails has
        finish_reason "error" and ``error`` set, the others are unaffected."""
        streams = self._start([(request.tokens, request.config, request.weights) for request in requests], None)
        results = []
        for stream in streams:
            try:
                stream.drain()
            except GenArmError:
                pass  # stream.result.error holds it
            results.append(stream.result)
        return results

    def _start(self, requests: Sequence[tuple], cancel: Cancel) -> list[Stream]:
        """Streams for (tokens, SamplingConfig, weights) requests, submitted together: they join the same step."""
        streams = []
        for tokens, config, weights in requests:
            job, poll = self._job(list(tokens), config, weights, cancel)
            streams.append(Stream(self, job, poll))
        self.engine.submit([stream.job for stream in streams])
        return streams

    def chat(
        self, messages: Sequence[Message], *, weights=None, cancel: Cancel = None, stream: bool = False, **sampling
    ) -> GenerationResult | Stream:
        """Reply to ``messages`` ([{"role": ..., "content": ...}, ...]) rendered with the chat template (see
        chat_template.py). The slot's KV cache is reused for the history, in whole chunks (scheduler.py), so a new
        turn decodes little more than what is new."""
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
        """log p(next token | tokens) under the guided distribution, before penalties and temperature (float32,
        n_vocab); masked tokens (``guard_min_p``, see SamplingConfig) are -inf."""
        config = SamplingConfig.from_options(dict(normalized=normalized, guard_min_p=guard_min_p, max_tokens=1))
        job, _ = self._job(self._prompt_tokens(tokens), config, weights, None)
        job.logprobs_into = np.empty(self.engine.n_vocab, dtype=np.float32)
        stream = Stream(self, job)
        self.engine.submit([job])
        stream.drain()
        if stream.result.finish_reason != "logprobs":
            raise ModelClosedError("the model was closed before the log-probabilities were computed")
        return job.logprobs_into

    # ---- lifetime ------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """End every generation (cancelled), then free contexts, adapters and models (in reverse order of loading).
        Waits at most for the decode step in progress; safe from any thread, and twice."""
        self._finalizer()

    def __enter__(self) -> GuidedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
