"""The engine thread: the one owner of the model and the scheduler (llama-server's shape, in Python).

HTTP handlers never touch a llama.cpp context: they validate a request, ``submit`` it, and read their own task's
mailbox. The thread loads the model, then loops: take new tasks → one scheduler step for every running sequence →
turn each row's token into text (stop strings included) and post it to that request's mailbox → wake, with one
call into the event loop per step, every handler that was waiting. A cancelled task (client gone) leaves the batch
at the next step.

The mailbox is what keeps the server's cost per token low (bench/bench_serve.py measures it against the in-process
API): a handler that has not read its last token yet finds the new one next to it, and sends both in one chunk,
instead of the engine thread waking the event loop once per token per client.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..core.api import GuidedModel, StopText
from ..core.config import LoadConfig
from ..core.engine import Step
from ..core.errors import GenArmError, ServerBusyError
from ..core.native import block_signals
from ..core.requests import Prepared
from ..core.scheduler import Job, Scheduler


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
    """One request on its way through the engine thread, and the mailbox its handler reads."""

    def __init__(self, prepared: Prepared, model: GuidedModel, loop: asyncio.AbstractEventLoop):
        config = prepared.config
        self.job = Job(prepared.tokens, config, list(prepared.weights.values()))
        self.text = StopText(model.engine.base_model.token_bytes, config.stop, config.stop_at_turns)
        self.completion_tokens = 0
        self.mailbox = Mailbox(loop)
        self._pending = self._empty_piece()

    def _empty_piece(self) -> Piece:
        wanted = self.job.config.logprobs is not None
        return Piece("", [], [] if wanted else None, [] if wanted else None)

    def cancel(self) -> None:
        self.job.cancel.set()

    def take(self, step: Step, wake: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]) -> tuple[str | None, bool]:
        """Add one step's token (a handler to wake goes in ``wake``); returns (finish reason or None, whether a stop
        string ended the text)."""
        pending = self._pending
        stopped = False
        if step.token is not None and step.finish_reason != "eos":
            self.completion_tokens += 1
            piece, stopped = self.text.push(step.token)
            pending.text += piece
            pending.tokens.append(step.token)
            if pending.logprobs is not None:
                pending.logprobs.append(step.logprob)
            if pending.top_logprobs is not None:
                pending.top_logprobs.append(step.top_logprobs)
        reason = "stop" if stopped or step.finish_reason == "eos" else step.finish_reason
        if reason and not stopped:
            pending.text += self.text.flush()
        if pending.text or (reason and pending.tokens):
            waiter = self.mailbox.post(pending)
            if waiter is not None:
                wake.append((self.mailbox.loop, waiter))
            self._pending = self._empty_piece()
        return reason, stopped


class EngineWorker:
    """Loads the model on its own thread and serves tasks with a Scheduler of ``parallel`` slots; at most
    ``parallel + queue_size`` tasks in flight (more: ServerBusyError)."""

    def __init__(self, load: LoadConfig, parallel: int, queue_size: int):
        self.load, self.parallel, self.queue_size = load, parallel, queue_size
        self.model: GuidedModel | None = None
        self.error: BaseException | None = None  # why loading failed
        self.ready = threading.Event()  # set once loading finished, well or not
        self.on_load_failure: Callable[[], None] | None = None
        self.on_ready: Callable[[], None] | None = None  # called on the engine thread once the model is loaded
        self._inbox: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._tasks: dict[int, Task] = {}
        # the handlers to wake at the end of this step, with their event loop
        self._wake: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="genarm-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, prepared: Prepared, loop: asyncio.AbstractEventLoop) -> Task:
        if self.model is None:
            raise ServerBusyError("the model is still loading; retry when GET /health answers 200")
        with self._lock:
            if self._in_flight >= self.parallel + self.queue_size:
                raise ServerBusyError(
                    f"the server is full ({self.parallel} running, {self.queue_size} waiting); retry later"
                )
            self._in_flight += 1
        task = Task(prepared, self.model, loop)
        self._inbox.put(task)
        return task

    # ---- the engine thread -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        block_signals()  # Ctrl-C and SIGTERM belong to uvicorn's loop in the main thread
        try:
            model = GuidedModel(config=self.load)
            scheduler = Scheduler(model.engine, self.parallel)
        except BaseException as exc:  # reported by the CLI as one line, and by /health
            self.error = exc
            self.ready.set()
            if self.on_load_failure is not None:
                self.on_load_failure()
            return
        self.model = model
        self.ready.set()
        if self.on_ready is not None:
            self.on_ready()
        try:
            while not self._stopping.is_set():
                self._take_tasks(scheduler, block=not scheduler.busy)
                self._wake_handlers()  # requests refused at admission
                if not scheduler.busy:
                    continue
                try:
                    events = scheduler.step()
                except Exception as exc:  # a bug, not a bad request: fail what runs, start over, keep serving
                    for task in list(self._tasks.values()):
                        self._end(task, Failed(exc))
                    self._wake_handlers()
                    scheduler.close()
                    scheduler = Scheduler(model.engine, self.parallel)
                    continue
                for job, step in events:
                    self._deliver(scheduler, job, step)
                self._wake_handlers()
        finally:
            for task in list(self._tasks.values()):
                self._end(task, Failed(ServerBusyError("the server is shutting down")))
            self._wake_handlers()
            scheduler.close()
            model.close()

    def _take_tasks(self, scheduler: Scheduler, block: bool) -> None:
        try:
            task = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while task is not None or not self._inbox.empty():
            if task is not None:
                self._tasks[id(task.job)] = task
                try:
                    scheduler.submit(task.job)
                except GenArmError as exc:
                    self._end(task, Failed(exc))
            try:
                task = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, scheduler: Scheduler, job: Job, step: Step) -> None:
        task = self._tasks.get(id(job))
        if task is None:
            return
        if step.finish_reason == "cancelled":
            self._end(task, None)
            return
        if step.finish_reason == "error":
            self._end(task, Failed(job.error))
            return
        reason, stopped = task.take(step, self._wake)
        if stopped:
            scheduler.release(job)
        if reason:
            self._end(task, Finished(reason, job, task.completion_tokens))

    def _end(self, task: Task, event: Finished | Failed | None) -> None:
        if self._tasks.pop(id(task.job), None) is None:
            return
        if event is not None:
            waiter = task.mailbox.post(event)
            if waiter is not None:
                self._wake.append((task.mailbox.loop, waiter))
        with self._lock:
            self._in_flight -= 1

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
