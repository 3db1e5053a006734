"""A loaded base and its ARMs, and the thread that runs their one decode loop.

One story, in the order of llama.cpp's examples/simple: load the base and every ARM → check vocabularies → (on the
engine thread) contexts, prefill, sampler chains, and the loop of scheduler.Scheduler.step → free in reverse order.
Every caller — GuidedModel's methods, the batch runner, the server's handlers — submits Jobs and reads their events;
none touches a llama.cpp context. Two threads generating on one model share the loop's steps. What the loop owns
changes only on its thread, between steps (``call``): that is how an ARM joins a running engine (``add_arm``).

An ARM is a full GGUF model (any size, same vocabulary: weak-to-strong guidance) or a GGUF LoRA adapter
(general.type = "adapter"), whose contexts are over the base's own loaded model with the adapter set on them, so the
weights are in memory once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .arm_metadata import Calibration, read_calibration
from .config import ArmSpec, LoadConfig, SamplingConfig, find_arm
from .context import Context
from .errors import (
    AdapterMismatchError,
    ContextOverflowError,
    CorruptModelError,
    GenArmError,
    InvalidOptionError,
    ModelClosedError,
    NotACheckpointError,
    VocabularyMismatchError,
)
from .native import Adapter, Model, block_signals, gguf_header
from .scheduler import Job, Scheduler

T = TypeVar("T")


@dataclass
class Arm:
    """One loaded ARM: what was asked for, its default weight α, the model its contexts run (the base's own for a
    LoRA ARM) and its adapter."""

    spec: ArmSpec
    alpha: float  # None when constructed: the recommended α
    model: Model
    adapter: Adapter | None  # a LoRA ARM: its contexts are over the base's model with this adapter set
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


class Engine:
    """Loaded base + ARMs and the one Scheduler over them, stepped by one engine thread (started on the first job).

    ``submit`` may be called from any thread; each job's events reach its ``on_event`` on the engine thread, and
    ``after_step`` callbacks run there after every step's events. ``close`` ends every job (cancelled), waits for the
    step in progress, stops the thread and frees everything."""

    def __init__(self, config: LoadConfig):
        self.config = config
        self.n_threads = config.threads
        # Concurrent: each active context decodes on its own thread with its share of the threads, at least one
        # (llama_decode releases the GIL). None: on the CPU, always -- a small model's decode scales sublinearly
        # across threads, so side by side each is faster than one after the other on all; and a context on one
        # thread never waits at a barrier for a thread another process took, so three contexts on two cores
        # (two ARMs) keep their speed beside a busy process where one after the other on two threads each lost
        # 3-5× (bench/speed.py measures it).
        self.concurrent = config.concurrent
        self._pool: ThreadPoolExecutor | None = None
        base = config.base_path()
        # Everything loaded so far is freed, in reverse order, if a later step fails: nothing half-loaded remains.
        with contextlib.ExitStack() as stack:
            if gguf_header(base)["type"] == "adapter":
                raise NotACheckpointError(f"{base} is a LoRA adapter, not a model: give it as an ARM of its base")
            self.base_model = stack.enter_context(Model(base, config))
            self.n_vocab = self.base_model.n_vocab
            # Replaced, never changed in place (add_arm): a thread that read it once sees one consistent list.
            self.arms: list[Arm] = [self._load_arm(spec, stack) for spec in config.arms]
            # ARMs loaded later (add_arm): freed after the scheduler's contexts, before the ones loaded here
            self._added = stack.enter_context(contextlib.ExitStack())
            self.scheduler = stack.enter_context(Scheduler(self, config.n_parallel, config.n_ctx))
            self._resources = stack.pop_all()
        self.n_ctx = config.n_ctx
        self.after_step: list[Callable[[], None]] = []
        self._inbox: queue.SimpleQueue[list[Job] | Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._free_on_exit = False  # close() was called on the engine thread: the loop frees everything as it ends

    def _load_arm(self, spec: ArmSpec, stack: contextlib.ExitStack) -> Arm:
        """Load one ARM, its native resources entered into ``stack``: a LoRA adapter over the base's model, or a full
        model whose vocabulary must be the base's."""
        header = gguf_header(spec.path)
        if header["type"] == "adapter":
            model = self.base_model
            adapter = stack.enter_context(self._load_adapter(spec.path, header["architecture"]))
        else:
            adapter = None
            model = stack.enter_context(Model(spec.path, self.config))
            check_same_vocabulary(self.base_model, model)
        # An ARM given without a weight runs at the α its calibration recommends; uncalibrated, the paper's 1.
        return Arm(spec, spec.alpha, model, adapter, read_calibration(spec.path))

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

    def add_arm(self, spec: ArmSpec) -> Arm:
        """Load one more ARM while the engine runs; from any thread but the engine's own. Jobs made before it run
        with α = 0 for it (Scheduler.check); requests made after may weight it like any other.

        A full model loads on the calling thread, while the loop goes on stepping. A LoRA adapter loads on the engine
        thread between two steps (``call``): llama.cpp registers it in the base model's set of adapters, which
        creating a context reads. There the ARM joins the list and the scheduler gets a place for its context."""
        self._check_new_arm(spec)
        with contextlib.ExitStack() as stack:
            is_adapter = gguf_header(spec.path)["type"] == "adapter"
            loaded = None if is_adapter else self._load_arm(spec, stack)

            def join() -> Arm:
                if self._closed:
                    raise ModelClosedError("this model is closed")
                self._check_new_arm(spec)  # again: another load may have taken the name meanwhile
                with contextlib.ExitStack() as here:  # an adapter that fails half-way is freed here, on this thread
                    arm = loaded or self._load_arm(spec, here)
                    self._added.enter_context(stack.pop_all())  # from here on nothing can fail
                    self._added.enter_context(here.pop_all())
                self.scheduler.add_model()
                self.arms = [*self.arms, arm]
                if self._pool is not None:  # sized by the number of ARMs; idle between steps
                    self._pool.shutdown()
                    self._pool = None
                return arm

            return self.call(join)

    def _check_new_arm(self, spec: ArmSpec) -> None:
        for arm in self.arms:
            if arm.name == spec.name:
                raise InvalidOptionError(
                    f"an ARM named {spec.name!r} is already loaded ({arm.spec.path}); give the new one another name"
                )
            if arm.spec.path.resolve() == spec.path.resolve():
                raise InvalidOptionError(f"{spec.path} is already loaded, as ARM {arm.name!r}")

    def new_context(self, index: int, n_ctx: int, n_seq_max: int = 1, n_batch: int = 512) -> Context:
        """A new context of model ``index`` (0: the base, i: ARM i - 1), the caller's to close."""
        arm = self.arms[index - 1] if index else None
        adapters = [(arm.adapter, 1.0)] if arm is not None and arm.adapter is not None else []
        model = arm.model if arm is not None else self.base_model
        return Context(model, self.config, n_ctx=n_ctx, n_seq_max=n_seq_max, n_batch=n_batch, adapters=adapters)

    def new_merged_context(self, scales: Sequence[tuple[int, float]], n_ctx: int, n_seq_max: int, n_batch: int):
        """A new context of the base with several LoRA ARMs' adapters set on it, ARM i at its scale
        (LoadConfig.merge_arms), the caller's to close."""
        adapters = [(self.arms[i].adapter, scale) for i, scale in scales]
        return Context(
            self.base_model, self.config, n_ctx=n_ctx, n_seq_max=n_seq_max, n_batch=n_batch, adapters=adapters
        )

    # ---- weights -------------------------------------------------------------------------------------------------

    def alphas(self, weights: Mapping[str, float | None] | None = None) -> list[float]:
        """Each ARM's α for one call: its default, overridden by ``weights`` (keyed as ArmSpec.matches says; a
        weight of None is the ARM's recommended α)."""
        arms = self.arms
        alphas = [arm.alpha for arm in arms]
        for key, alpha in (weights or {}).items():
            index = find_arm([arm.spec for arm in arms], key)
            alphas[index] = arms[index].recommended_alpha if alpha is None else float(alpha)
        return alphas

    def check_prompt(self, n_tokens: int) -> None:
        """Refuse a prompt that leaves no room in a sequence's context for a single generated token."""
        if n_tokens >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {n_tokens} tokens but a sequence's context holds {self.n_ctx}, with room for the "
                "reply; shorten the prompt or load with a larger n_ctx (-c)"
            )

    @staticmethod
    def temperature_factor(config: SamplingConfig, active: Sequence[tuple[Arm, float]]) -> float:
        """What the sampler chain multiplies T by: ``scale_temperature`` samples the guided distribution at
        T·(1+Σα⁺), the positive weights' sum (SamplingConfig); a negative weight sharpens nothing (mixing.guide)."""
        positive = sum(alpha for _, alpha in active if alpha > 0)
        return 1.0 + positive if config.scale_temperature else 1.0

    @staticmethod
    def normalizer(alphas: Sequence[float]) -> float:
        """1 + Σα⁺: the paper's form divides the guided log-probs by it (``normalized``); a negative weight's
        one-sided term takes nothing from the scale (mixing.guide)."""
        return 1.0 + sum(alpha for alpha in alphas if alpha > 0)

    # ---- jobs ----------------------------------------------------------------------------------------------------

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue ``jobs`` (any thread); they join the loop together, in this order, at its next step."""
        for job in jobs:
            self.scheduler.check(job)
        self._post(list(jobs))

    def call(self, work: Callable[[], T]) -> T:
        """Run ``work`` on the engine thread between two steps and return its result (or raise its error); from any
        thread. How what the loop owns — the ARM list, the scheduler's contexts — changes while jobs run."""
        if threading.current_thread() is self._thread:
            return work()
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(work())
            except BaseException as exc:  # the caller's error, not the loop's
                future.set_exception(exc)

        self._post(run)
        return future.result()

    def _post(self, item: list[Job] | Callable[[], None]) -> None:
        with self._lock:
            if self._closed:
                raise ModelClosedError("this model is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="genarm-engine", daemon=True)
                self._thread.start()
            self._inbox.put(item)

    def _run(self) -> None:
        """The engine thread: take new jobs and calls, step, hand each job its events; until close()."""
        block_signals()  # Ctrl-C belongs to the main thread, which cancels what it waits for
        scheduler = self.scheduler
        while True:
            try:
                batches = [self._inbox.get(block=not scheduler.busy)]
            except queue.Empty:
                batches = []
            with contextlib.suppress(queue.Empty):
                while True:
                    batches.append(self._inbox.get_nowait())
            for item in batches:  # in the order they were posted: a job posted after a call sees its effect
                if callable(item):
                    item()
                else:
                    for job in item or ():
                        scheduler.submit(job)
            if None in batches:
                break
            try:
                events = scheduler.step()
            except Exception as exc:  # a bug, not a bad request: fail what runs, start over, keep serving
                failure = exc if isinstance(exc, GenArmError) else GenArmError(f"internal error: {exc!r}")
                events = scheduler.cancel_all(failure)
                scheduler.reset()
            self._deliver(events)
        self._deliver(scheduler.cancel_all())
        if self._free_on_exit:
            self._free()

    def _deliver(self, events) -> None:
        for job, event in events:
            job.on_event(event)
        if events:
            for callback in self.after_step:
                callback()

    # ---- decoding contexts side by side ----------------------------------------------------------------------------

    def _concurrent(self, contexts: Sequence[Context]) -> bool:
        if len(contexts) < 2:
            return False
        if self.concurrent is not None:
            return self.concurrent
        return self.config.n_gpu_layers == 0

    def each(self, contexts: Sequence[Context], work: Callable[[Context], T]) -> list[T]:
        """``work(context)`` for every context: one after the other, or concurrently on the pool's threads. Returns
        (or raises the first error) only once every call has returned, so nothing touches a context still decoding."""
        if not self._concurrent(contexts):
            return [work(context) for context in contexts]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=max(1, len(self.arms)), thread_name_prefix="genarm-decode", initializer=block_signals
            )
        others = [self._pool.submit(work, context) for context in contexts[1:]]
        try:
            first = work(contexts[0])
        finally:
            concurrent.futures.wait(others)
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

    # ---- lifetime --------------------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """End every job (cancelled), wait for the step in progress, stop the engine thread, free contexts, adapters
        and models in reverse order. From the engine thread itself (a job's on_event) it only asks the loop to stop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        self.scheduler.stopping.set()
        if thread is not None:
            self._inbox.put(None)
            if thread is threading.current_thread():
                self._free_on_exit = True  # the loop ends after this step and frees everything then
                return
            thread.join()
        self._free()

    def _free(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._resources.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
