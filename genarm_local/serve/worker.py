"""The server's side of the model's one decode loop (core/engine.py): requests in, events out to their handlers.

HTTP handlers never touch a llama.cpp context: they validate a request, ``submit`` it, and read their own task's
mailbox. The model's engine thread steps every running request together and hands each job's events to its Task,
which posts them to the handler's mailbox; after each step one call into the event loop wakes every handler that was
waiting (``after_step``). A cancelled task (client gone) leaves the batch at the next step.

The mailbox is what keeps the server's cost per token low (bench/bench_serve.py measures it against the in-process
API): a handler that has not read its last token yet finds the new one next to it, and sends both in one chunk,
instead of the engine thread waking the event loop once per token per client.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..core.api import GuidedModel
from ..core.config import LoadConfig
from ..core.errors import ServerBusyError
from ..core.native import block_signals
from ..core.requests import Prepared
from ..core.scheduler import Event, Job


@dataclass
class Piece:
    """Text that became final, with the tokens sampled since the last piece (and their log-probs on request)."""

    text: str
    tokens: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None

    def extend(self, later: Piece) -> None:
        """Append the piece that followed this one (two pieces a handler reads at once become one chunk)."""
        self.text += later.text
        self.tokens += later.tokens
        if self.logprobs is not None and later.logprobs is not None:
            self.logprobs += later.logprobs
            self.top_logprobs += later.top_logprobs


@dataclass
class Finished:
    reason: str  # OpenAI's finish_reason: "stop" (EOS or a stop string) or "length"
    job: Job  # its timings and cached_tokens
    completion_tokens: int


@dataclass
class Failed:
    error: BaseException


@dataclass
class Counters:
    """Totals since the server started, as llama-server's /metrics counts them: requests that ended, prompt tokens
    decoded (cached ones not counted) and tokens generated, with the seconds spent on each."""

    requests: int = 0
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0


class Mailbox:
    """Events from the engine thread to one handler, on the handler's event loop.

    The engine thread ``post``s; the handler awaits ``receive``, which returns everything posted since its last
    call. Only a handler already waiting on an empty mailbox needs waking: ``post`` returns its future, and the
    engine thread resolves all of a step's futures with one call into the event loop (``resolve``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._mail: list[Piece | Finished | Failed] = []
        self._waiter: asyncio.Future | None = None

    def post(self, event: Piece | Finished | Failed) -> asyncio.Future | None:
        """Post ``event`` (any thread); returns the handler's future to resolve if it was waiting for one."""
        with self._lock:
            self._mail.append(event)
            waiter, self._waiter = self._waiter, None
        return waiter

    async def receive(self) -> list[Piece | Finished | Failed]:
        """The events posted since the last call, waiting for at least one; [] after ``interrupt``."""
        with self._lock:
            if self._mail:
                mail, self._mail = self._mail, []
                return mail
            waiter = self._waiter = self.loop.create_future()
        await waiter
        with self._lock:
            mail, self._mail = self._mail, []
        return mail

    def interrupt(self) -> None:
        """Make a waiting ``receive`` return (on the handler's loop: the client went away)."""
        with self._lock:
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            resolve([waiter])


def resolve(waiters: list[asyncio.Future]) -> None:
    for waiter in waiters:
        if not waiter.done():  # a handler cancelled while it waited leaves its future cancelled
            waiter.set_result(None)


class Task:
    """One request on its way through the decode loop, and the mailbox its handler reads."""

    def __init__(self, prepared: Prepared, worker: EngineWorker, loop: asyncio.AbstractEventLoop):
        config = prepared.config
        self.job = Job(prepared.tokens, config, list(prepared.weights.values()), on_event=self._take)
        self.worker = worker
        self.completion_tokens = 0
        self.mailbox = Mailbox(loop)
        self._pending = self._empty_piece()

    def _empty_piece(self) -> Piece:
        wanted = self.job.config.logprobs is not None
        return Piece("", [], [] if wanted else None, [] if wanted else None)

    def cancel(self) -> None:
        self.job.cancel.set()

    def _take(self, event: Event) -> None:
        """One event of the job (on the engine thread). Tokens gather in a Piece until they make text (a character
        split across tokens, a possible stop string held back), which is posted with them; the end follows as
        Finished or Failed. A handler that was waiting goes to the worker's wake list."""
        pending = self._pending
        if event.token is not None:
            self.completion_tokens += 1
            pending.tokens.append(event.token)
            if pending.logprobs is not None:
                pending.logprobs.append(event.logprob)
                pending.top_logprobs.append(event.top_logprobs)
        pending.text += event.text
        reason = event.finish_reason
        posts = []
        if pending.text or (reason and pending.tokens):
            posts.append(pending)
            self._pending = self._empty_piece()
        if reason == "error":
            posts.append(Failed(event.error))
        elif reason == "cancelled":
            posts.append(Failed(ServerBusyError("the request was cancelled (the server is shutting down)")))
        elif reason:
            # OpenAI's finish_reason: "stop" at the end of generation or a stop string, else "length"
            posts.append(Finished("length" if reason == "length" else "stop", self.job, self.completion_tokens))
        for post in posts:
            waiter = self.mailbox.post(post)
            if waiter is not None:
                self.worker.wake(self.mailbox.loop, waiter)
        if reason:
            self.worker.finished(self)


class EngineWorker:
    """Loads the model on its own thread (so the server answers /health while it loads), then submits tasks to the
    model's decode loop; at most ``n_parallel + queue_size`` tasks in flight (more: ServerBusyError)."""

    def __init__(self, load: LoadConfig, queue_size: int):
        self.load, self.queue_size = load, queue_size
        self.parallel = load.n_parallel
        self.model: GuidedModel | None = None
        self.error: BaseException | None = None  # why loading failed
        self.ready = threading.Event()  # set once loading finished, well or not
        self.on_load_failure: Callable[[], None] | None = None
        self.on_ready: Callable[[], None] | None = None  # called on the loading thread once the model is loaded
        # the handlers to wake at the end of this step, with their event loop (engine thread only)
        self._wake: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._in_flight = 0
        self._tasks: set[Task] = set()  # submitted and not finished: running in a slot (job.slot set) or waiting
        self.counters = Counters()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._load, name="genarm-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._thread.join()
        if self.model is not None:
            self.model.close()  # every task still running ends (Failed: shutting down), its handler woken

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def tasks(self) -> list[Task]:
        """The tasks submitted and not finished yet (any thread)."""
        with self._lock:
            return list(self._tasks)

    def submit(self, prepared: Prepared, loop: asyncio.AbstractEventLoop) -> Task:
        if self.model is None:
            raise ServerBusyError("the model is still loading; retry when GET /health answers 200")
        with self._lock:
            if self._in_flight >= self.parallel + self.queue_size:
                raise ServerBusyError(
                    f"the server is full ({self.parallel} running, {self.queue_size} waiting); retry later"
                )
            self._in_flight += 1
        task = Task(prepared, self, loop)
        with self._lock:
            self._tasks.add(task)
        try:
            self.model.engine.submit([task.job])
        except BaseException:
            self.finished(task, ran=False)
            raise
        return task

    def finished(self, task: Task, ran: bool = True) -> None:
        """``task`` left (its job ended, or it was never submitted): its place frees, its work is counted."""
        timings = task.job.timings
        with self._lock:
            self._in_flight -= 1
            self._tasks.discard(task)
            if ran:
                counters = self.counters
                counters.requests += 1
                counters.prompt_tokens += timings.prompt_decoded
                counters.prompt_seconds += timings.prompt_s
                counters.generated_tokens += timings.generated_tokens
                counters.generation_seconds += timings.generation_s

    def wake(self, loop: asyncio.AbstractEventLoop, waiter: asyncio.Future) -> None:
        self._wake.append((loop, waiter))

    def _load(self) -> None:
        block_signals()  # Ctrl-C and SIGTERM belong to uvicorn's loop in the main thread
        try:
            model = GuidedModel(config=self.load)
        except BaseException as exc:  # reported by the CLI as one line, and by /health
            self.error = exc
            self.ready.set()
            if self.on_load_failure is not None:
                self.on_load_failure()
            return
        model.engine.after_step.append(self._wake_handlers)
        self.model = model
        self.ready.set()
        if self.on_ready is not None:
            self.on_ready()

    def _wake_handlers(self) -> None:
        """Resolve the futures of the handlers that were waiting: one call into each event loop (there is one)."""
        if not self._wake:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
        for loop, waiter in self._wake:
            by_loop.setdefault(loop, []).append(waiter)
        self._wake.clear()
        for loop, waiters in by_loop.items():
            try:
                loop.call_soon_threadsafe(resolve, waiters)
            except RuntimeError:  # that event loop is gone (server shutting down): nobody to tell
                pass
