"""The one thread that owns the engine: it loads models and runs completions, in order.

The engine is synchronous and not thread-safe, so nothing else touches it. Results go
back to the event loop as asyncio futures, resolved on the loop's thread only, so that a
superseded or cancelled request can be answered at once while its job is still queued
or decoding (the engine stops at the next decode step once the CancelToken is set).

What the worker holds (state, engine, the engine's key, the last error) is one immutable
WorkerStatus, replaced whole under a lock by both threads: load() on the event loop marks
it loading, the worker thread installs what a load produced. A reader takes status() once
and sees a consistent value: never "ready" without an engine, never an engine with the
key of another.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from codecomplete.request import Completion, CompletionRequest

from .engines import close_engine

logger = logging.getLogger("codecomplete.lsp")

# (model folder or None for the default, runtime, device) -> an object with .complete(request)
EngineFactory = Callable[[str | None, str, str], Any]


def default_engine_factory(model: str | None, runtime: str, device: str) -> Any:
    """The real engine (imported late: it pulls in the runtime)."""
    from codecomplete.engine import Engine

    return Engine.load(model, runtime=runtime, device=device)


@dataclass
class LoadResult:
    ok: bool
    message: str = ""  # the error, or a short description of the loaded model
    elapsed_ms: float = 0.0
    superseded: bool = False


@dataclass(frozen=True)
class WorkerStatus:
    """What the worker has now; replaced whole, never changed in place."""

    state: str = "idle"  # idle | loading | ready | error
    engine: Any = None
    engine_key: tuple | None = None  # (model, runtime, device) that made engine
    error: str = ""  # why the last load failed ("" after a successful one)

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.engine is not None


@dataclass
class Job:
    """One completion request on its way through the worker."""

    request: CompletionRequest
    future: asyncio.Future  # -> Completion | None, set on the event loop only
    received: float = field(default_factory=time.perf_counter)
    started: float = 0.0

    def supersede(self) -> None:
        """Stop the work (at the next decode step) and answer empty right away."""
        self.request.cancel.cancel()
        if not self.future.done():
            self.future.set_result(None)


class Worker:
    """A daemon thread with a queue of load and completion jobs."""

    def __init__(self, factory: EngineFactory, loop: asyncio.AbstractEventLoop):
        self._factory = factory
        self._loop = loop
        self._queue: queue.Queue = queue.Queue()
        # Guards _status and _load_generation: load() writes them on the event loop's
        # thread, _load on the worker's; a check-then-write of either happens under it.
        self._lock = threading.Lock()
        self._load_generation = 0
        self._status = WorkerStatus()
        self._thread = threading.Thread(target=self._run, name="codecomplete-worker", daemon=True)
        self._thread.start()

    def status(self) -> WorkerStatus:
        """A consistent snapshot of state, engine, engine_key and error."""
        return self._status

    @property
    def engine(self) -> Any:
        return self._status.engine

    @property
    def ready(self) -> bool:
        return self._status.ready

    def load(self, model: str | None, runtime: str, device: str) -> asyncio.Future:
        """Queue a (re)load; resolves to a LoadResult. The old engine stays if it fails."""
        future = self._loop.create_future()
        with self._lock:
            self._load_generation += 1
            self._status = replace(self._status, state="loading")
            self._queue.put(("load", (self._load_generation, (model, runtime, device)), future))
        return future

    def complete(self, request: CompletionRequest) -> Job:
        """Queue a completion (its deadline stamped by the caller); its future resolves to a
        Completion or None (no answer)."""
        job = Job(request, self._loop.create_future())
        self._queue.put(("complete", job, job.future))
        return job

    def stop(self) -> None:
        self._queue.put(None)

    # -- the thread ---------------------------------------------------------------------
    def _resolve(self, future: asyncio.Future, value: Any) -> None:
        def set_if_pending() -> None:
            if not future.done():
                future.set_result(value)

        try:
            self._loop.call_soon_threadsafe(set_if_pending)
        except RuntimeError:  # the loop is closed: the server is going away
            pass

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            kind, payload, future = item
            try:
                if kind == "load":
                    self._resolve(future, self._load(*payload))
                else:
                    self._resolve(future, self._complete(payload))
            except BaseException:  # never let the worker die: the server must keep answering
                logger.exception("worker job failed")
                self._resolve(future, None if kind == "complete" else LoadResult(False, "internal error"))

    def _is_current(self, generation: int) -> bool:
        """Whether no newer load has been queued since this one (call under the lock)."""
        return generation == self._load_generation

    def _load(self, generation: int, key: tuple) -> LoadResult:
        with self._lock:
            if not self._is_current(generation):
                return LoadResult(False, superseded=True)
        t0 = time.perf_counter()
        model, runtime, device = key
        try:
            engine = self._factory(model, runtime, device)
        except Exception as e:  # ModelLoadError and anything else a broken model can raise
            elapsed = (time.perf_counter() - t0) * 1000.0
            error = f"{type(e).__name__}: {e}" if not str(e).strip() else str(e)
            with self._lock:
                current = self._is_current(generation)
                old = self._status
                # A newer load is queued: the state stays "loading" and that load reports.
                state = ("ready" if old.engine is not None else "error") if current else old.state
                self._status = replace(old, state=state, error=error)
            return LoadResult(False, error, elapsed, superseded=not current)
        with self._lock:
            current = self._is_current(generation)
            # Installed even when superseded: if the newer load fails, this one is what stays.
            old = self._status.engine
            self._status = WorkerStatus("ready" if current else self._status.state, engine, key, "")
        if old is not None and old is not engine:
            close_engine(old)  # a child process or a connection of the replaced engine
        if not current:  # a newer load is queued: it will report
            return LoadResult(True, superseded=True)
        describe = getattr(engine, "describe", None)
        try:
            message = str(describe()) if callable(describe) else type(engine).__name__
        except Exception:
            message = type(engine).__name__
        return LoadResult(True, message, (time.perf_counter() - t0) * 1000.0)

    def _complete(self, job: Job) -> Completion | None:
        request = job.request
        if request.cancel.cancelled or self.engine is None:
            return None
        job.started = time.perf_counter()
        if time.monotonic() >= request.decode_deadline():  # it waited in the queue past its deadline
            return None
        try:
            return self.engine.complete(request)
        except Exception:
            logger.exception("completion failed for %s at offset %d", request.path or "<untitled>", request.offset)
            return None
