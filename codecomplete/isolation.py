"""The engine in a child process, so that a native crash in the model runtime (SIGSEGV,
SIGFPE, SIGKILL from the out-of-memory killer) ends the child and not the language server
or the CLI; and, in a team server's replica, so that the engine's batch scheduler has a GIL
of its own instead of sharing one with the replica's HTTP handling and Ray's threads.

`ProcessEngine` has the engine's face (`complete`, `describe`, `forget`). The child is a
fresh interpreter (`python -c`, no fork of a server with threads) that gets one end of a
socket pair as an inherited file descriptor; each request goes to it as JSON
(`wire.request_to_json`, length-framed by multiprocessing.connection's bytes calls) and the
answer comes back the same way, so nothing from the child is ever unpickled. Requests carry
a number: any number of threads may call `complete` at once, the child runs up to
`concurrency` of them at once in threads of its own (the rest wait in its queue, in the
order they came), and one reader thread in the parent hands each answer to the caller
waiting for that number. The same reader passes a CancelToken's cancellation on (a
`cancel` message that the child's reader turns into that request's token, seen between
decode steps) and kills a child that stays silent long past a request's deadline. A child
that dies makes every request it held answer None, logs one error naming the signal, and is
restarted (the model reloaded) in the background with growing pauses; after `MAX_RESTARTS`
crashes in a row the engine stays down in state "error" until it is replaced.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection, wait
from typing import Any

from codecomplete.request import CancelToken, Completion, CompletionRequest
from codecomplete.wire import (
    completion_from_json,
    completion_to_json,
    outgoing_request_json,
    request_from_json,
)

logger = logging.getLogger("codecomplete.isolation")

MAX_RESTARTS = 5  # crashes in a row (no answer in between) before the engine gives up
RESTART_PAUSES_S = (0.0, 0.5, 1.0, 2.0, 4.0)  # before restart k (the last one repeats)
CANCEL_POLL_S = 0.005  # how often a waiting request looks at its CancelToken
HUNG_GRACE_S = 30.0  # a child silent this long past the deadline (or a cancel) is killed: a
# prefill is not cut by the deadline and takes seconds on a busy machine, and a kill costs a reload
STDERR_FD = 2  # the file descriptor, not sys.stderr: that may be a test capture without one
SETTABLE = ("reuse_keystrokes",)  # engine attributes a caller may set through the pipe (bench)

StatusCallback = Callable[[str, str], None]  # (state, message), called from any thread


class EngineCrashed(RuntimeError):
    """The child process died (a signal or an exit) instead of answering."""

    def __init__(self, cause: str, while_doing: str):
        super().__init__(f"the model runtime crashed ({cause}) while {while_doing}")
        self.cause = cause


class EngineLoadFailed(RuntimeError):
    """The child could not build the engine (a bad model folder, say); the message is the child's."""


def exit_cause(exitcode: int | None) -> str:
    """'SIGFPE' for a process killed by signal 8, 'exit code 3' for an exit, 'no exit code' for None."""
    if exitcode is None:
        return "no exit code"
    if exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


# -- the child ----------------------------------------------------------------------------------
def _send(conn: Connection, message: dict) -> None:
    conn.send_bytes(json.dumps(message).encode("utf-8"))


def _receive(conn: Connection) -> dict:
    message = json.loads(conn.recv_bytes().decode("utf-8"))
    if not isinstance(message, dict):
        raise ValueError("expected a JSON object")
    return message


def _prepare_child() -> None:
    """No core files (the parent reports the crash), a Python traceback on stderr when native
    code faults, and Ctrl-C left to the parent."""
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    except (ImportError, ValueError, OSError):
        pass
    import faulthandler

    faulthandler.enable(file=sys.stderr)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # No PR_SET_PDEATHSIG: it fires when the parent *thread* that started the child ends,
    # and restarts start children from short-lived threads. A parent that dies closes the
    # socket instead, and the child's next read ends it.


def _describe(engine: Any) -> Any:
    describe = getattr(engine, "describe", None)
    try:
        return json.loads(json.dumps(describe() if callable(describe) else type(engine).__name__, default=str))
    except Exception:
        return type(engine).__name__


def import_by_name(spec: str) -> Callable[..., Any]:
    module_name, _, qualname = spec.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _answer(engine: Any, message: dict, cancel: CancelToken) -> dict:
    """The child's answer to one message (complete, forget, set)."""
    op, seq = message.get("op"), message.get("seq", 0)
    try:
        if op == "complete":
            request = request_from_json(message.get("request"))
            request.cancel = cancel
            completion = engine.complete(request)
            return {"op": "completion", "seq": seq, "completion": completion_to_json(completion),
                    "rows": [completion.decode_rows, completion.branch_rows]}
        if op == "forget":
            if callable(getattr(engine, "forget", None)):
                engine.forget()
            return {"op": "done", "seq": seq}
        if op == "set":
            for name, value in (message.get("attributes") or {}).items():
                if name in SETTABLE:
                    setattr(engine, name, value)
            return {"op": "done", "seq": seq}
        return {"op": "failed", "seq": seq, "message": f"unknown operation {op!r}"}
    except Exception as e:  # a Python error in the engine: the child goes on
        return {"op": "failed", "seq": seq, "message": f"{type(e).__name__}: {e}"}


def child_main(argv: list[str] | None = None) -> None:
    """The child: build the engine, then answer messages until the pipe closes. Its main
    thread only reads: each request runs in one of `concurrency` worker threads (the start
    message says how many), so that a cancel, handled here at once, reaches a request that
    is mid-decode.

    argv: CONNECTION_FD (the first message brings the factory and its arguments)."""
    conn = Connection(int((argv if argv is not None else sys.argv[1:])[0]))
    _prepare_child()
    try:
        start = _receive(conn)
        engine = import_by_name(start["factory"])(*start.get("args", ()))
        for name, value in (start.get("attributes") or {}).items():
            if name in SETTABLE:
                setattr(engine, name, value)
    except (EOFError, OSError):
        return
    except BaseException as e:  # the parent shows the message, as for an in-process load
        _send(conn, {"op": "load_failed", "type": type(e).__name__, "message": str(e) or type(e).__name__})
        return
    _send(conn, {"op": "ready", "describe": _describe(engine)})
    lock = threading.Lock()  # guards tokens and the sends
    tokens: dict[int, CancelToken] = {}  # the requests not answered yet

    def run(message: dict, token: CancelToken) -> None:
        seq = message.get("seq", 0)
        answer = _answer(engine, message, token)
        with lock:
            tokens.pop(seq, None)
            try:
                try:
                    _send(conn, answer)
                except (TypeError, ValueError) as e:  # an answer JSON cannot carry: its caller must not wait on
                    _send(conn, {"op": "failed", "seq": seq, "message": f"{type(e).__name__}: {e}"})
            except OSError:  # the parent is gone: the main thread's next read ends the child
                pass

    workers = ThreadPoolExecutor(max_workers=max(1, int(start.get("concurrency", 1))), thread_name_prefix="engine")
    while True:
        try:
            message = _receive(conn)
        except (EOFError, OSError):  # the parent is gone
            break
        seq = message.get("seq", 0)
        if message.get("op") == "cancel":
            with lock:
                token = tokens.get(seq)
            if token is not None:  # else answered already
                token.cancel()
            continue
        token = CancelToken()
        with lock:
            tokens[seq] = token
        workers.submit(run, message, token)
    with lock:  # nobody waits for the answers: stop the running ones at their next step
        for token in tokens.values():
            token.cancel()
    workers.shutdown(wait=False, cancel_futures=True)


class EngineStatus:
    """The state an engine that can fail on its own reports to the editor: ready, or
    restarting / loading / error with a message; watchers hear of each change."""

    state = "ready"
    message = ""
    _status_callback: StatusCallback | None = None

    def watch_status(self, callback: StatusCallback | None) -> None:
        """Call callback(state, message) on every change of state (from any thread), and now
        when the engine is not ready."""
        self._status_callback = callback
        if callback is not None and self.state != "ready":
            callback(self.state, self.message)

    def _set_state(self, state: str, message: str) -> None:
        self.state, self.message = state, message
        callback = self._status_callback
        if callback is not None:
            try:
                callback(state, message)
            except Exception:
                logger.exception("status callback failed")


# -- the parent -----------------------------------------------------------------------------------
class _Waiting:
    """A message sent to the child and not answered yet: its caller waits on `done`."""

    __slots__ = ("op", "cancel", "give_up_at", "cancel_sent", "answer", "done")

    def __init__(self, op: str, cancel: CancelToken | None, give_up_at: float):
        self.op, self.cancel, self.give_up_at = op, cancel, give_up_at
        self.cancel_sent = False
        self.answer: dict | None = None  # None: the child died or hung
        self.done = threading.Event()


class _Child:
    """One child process, its end of the pipe, and the messages it has not answered."""

    def __init__(self, process: subprocess.Popen, conn: Connection, description: Any):
        self.process, self.conn, self.description = process, conn, description
        self.waiting: dict[int, _Waiting] = {}  # by seq
        self.lock = threading.Lock()  # guards waiting, finished and the wake pipe
        self.send_lock = threading.Lock()  # one message at a time on the pipe
        self.finished = False  # the reader has stopped: nothing more is answered
        self.stopping = False  # closed on purpose, not a crash
        # the reader blocks without a timeout while nothing is in flight: a byte here wakes it
        self.wake_r, self.wake_w = os.pipe()
        self.reader: threading.Thread | None = None

    def ask(self, seq: int, message: dict, cancel: CancelToken | None, give_up_at: float) -> dict | None:
        """Send message (numbered seq) and wait for its answer; None when the child died or hung."""
        waiting = _Waiting(message["op"], cancel, give_up_at)
        with self.lock:
            if self.finished:
                return None
            if not self.waiting:
                os.write(self.wake_w, b"w")  # the reader polls cancels and deadlines from now on
            self.waiting[seq] = waiting
        try:
            with self.send_lock:
                if self.conn.closed:
                    raise OSError("the pipe is closed")
                _send(self.conn, {**message, "seq": seq})
        except (OSError, ValueError):  # the pipe broke: the reader sees the child gone
            with self.lock:
                self.waiting.pop(seq, None)
            return None
        waiting.done.wait()  # the reader always sets it: an answer, or None once the child is gone
        return waiting.answer

    def deliver(self, answer: dict) -> None:
        with self.lock:
            waiting = self.waiting.pop(answer.get("seq"), None)
        if waiting is not None:  # else a caller that gave up on a broken pipe
            waiting.answer = answer
            waiting.done.set()

    def overdue(self, now: float) -> bool:
        """Pass new cancellations on to the child; True when a message is past its give-up time."""
        with self.lock:
            waiting = list(self.waiting.items())
        for seq, w in waiting:
            if not w.cancel_sent and w.cancel is not None and w.cancel.cancelled:
                # a caller blocked in a send to a stopped child holds the lock: try again next poll
                if self.send_lock.acquire(blocking=False):
                    try:
                        _send(self.conn, {"op": "cancel", "seq": seq})
                    finally:
                        self.send_lock.release()
                    w.cancel_sent = True
                    w.give_up_at = min(w.give_up_at, now + HUNG_GRACE_S)
            if now > w.give_up_at:
                return True
        return False

    def finish(self) -> tuple[list[_Waiting], str]:
        """Stop answering: close the pipe; the messages still waiting (their callers not told
        yet) and what the child was doing."""
        with self.lock:
            if self.finished:
                return [], ""
            self.finished = True
            waiting, self.waiting = list(self.waiting.values()), {}
            os.close(self.wake_r)
            os.close(self.wake_w)
        with self.send_lock:
            self.conn.close()
        completing = sum(w.op == "complete" for w in waiting)
        if completing:
            doing = "completing a request" if completing == 1 else f"completing {completing} requests"
        else:
            doing = f"running {waiting[0].op}" if waiting else "waiting for a request"
        return waiting, doing

    def wake(self) -> None:
        with self.lock:
            if not self.finished:
                os.write(self.wake_w, b"w")


def _release(waiting: list[_Waiting]) -> None:
    """Their callers answer None."""
    for w in waiting:
        w.done.set()


class ProcessEngine(EngineStatus):
    """An engine built by `factory(*factory_args)` in a child process (a fresh interpreter that
    imports the factory by name: a module-level function, its arguments plain JSON values).
    Any number of threads may call `complete` at once: up to `concurrency` requests run in
    the child at once (each in a thread of its own there: an engine that batches, or one
    request at a time with the default 1), the others wait in the child's queue."""

    def __init__(self, factory: Callable[..., Any], factory_args: tuple = (), label: str = "the model",
                 restart: bool = True, concurrency: int = 1):
        self._factory_spec = factory_spec(factory)
        self._factory_args, self.label = json.loads(json.dumps(list(factory_args))), label
        self._restart_after_crash = restart  # False (the CLI): a crash leaves the engine in state "error"
        self.concurrency = max(1, int(concurrency))
        self._seq = 0
        self._attributes: dict[str, Any] = {}  # set on the engine (SETTABLE), also after a restart
        self._lock = threading.Lock()  # guards the child, the state and the crash count
        self._child: _Child | None = None
        self._closed = False
        self._crashes = 0
        self.last_crash = ""  # what ended the last child that died: "SIGFPE", "exit code 1", ...
        self.last_error = ""  # the last Python error the engine raised in the child
        self.state = "ready"  # ready | restarting | error
        self.child_description: Any = None  # the engine's describe() in the latest child (kept once closed)
        self._install(self._start_child())

    # -- the engine's face --------------------------------------------------------------
    def describe(self) -> Any:
        description = self.child_description
        if isinstance(description, dict):
            return {**description, "isolation": "process"}
        return {"engine": description, "isolation": "process"}

    def complete(self, request: CompletionRequest) -> Completion | None:
        """The child's answer; None when it crashed (it restarts) or is not running."""
        seq, child = self._next()
        if child is None:
            return None
        payload = outgoing_request_json(request)
        if payload is None:  # a document that gets no completions (too big, binary)
            return Completion([])
        give_up_at = time.monotonic() + payload["options"]["deadline_ms"] / 1000.0 + HUNG_GRACE_S
        answer = child.ask(seq, {"op": "complete", "request": payload}, request.cancel, give_up_at)
        if answer is None:  # the child died or hung: the reader has logged it and restarts it
            return None
        if answer.get("op") != "completion":
            self.last_error = str(answer.get("message", "no message"))
            logger.error("completion failed in the engine process: %s", self.last_error)
            return None
        with self._lock:
            self._crashes = 0
        completion = completion_from_json(answer["completion"])
        completion.decode_rows, completion.branch_rows = (int(x) for x in answer.get("rows", (0, 0)))
        return completion

    def forget(self) -> None:
        self._call({"op": "forget"})

    @property
    def reuse_keystrokes(self) -> bool:
        return self._reuse_keystrokes

    @reuse_keystrokes.setter
    def reuse_keystrokes(self, value: bool) -> None:
        self._reuse_keystrokes = bool(value)
        self._attributes["reuse_keystrokes"] = bool(value)  # a restarted child gets it too
        self._call({"op": "set", "attributes": {"reuse_keystrokes": bool(value)}})

    _reuse_keystrokes = True

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.process.pid if child is not None else None

    def close(self) -> None:
        """Stop the child (and any restart in progress); requests in flight answer None."""
        with self._lock:
            self._closed = True
            child, self._child = self._child, None
        if child is None:
            return
        child.stopping = True
        child.wake()
        if child.reader is not None and child.reader is not threading.current_thread():
            child.reader.join(2.0)
        waiting, _ = child.finish()  # a healthy child exits on the pipe's EOF
        _release(waiting)
        _stop(child.process, None)

    # -- the child's lifecycle ------------------------------------------------------------
    def _next(self) -> tuple[int, _Child | None]:
        """A new request number, and the child to send it to (None while it is not ready)."""
        with self._lock:
            if self.state != "ready" or self._child is None:
                return 0, None
            self._seq += 1
            return self._seq, self._child

    def _call(self, message: dict) -> None:
        """A small synchronous operation (forget, set); a crash is handled as in complete."""
        seq, child = self._next()
        if child is not None:
            child.ask(seq, message, None, time.monotonic() + 60.0)

    def _start_child(self) -> _Child:
        parent_sock, child_sock = socket.socketpair()
        # -P: the working folder stays off sys.path, so that run from a source checkout the
        # child imports the installed package, not the checkout's codecomplete/ folder. The
        # environment is inherited: a Ray GPU replica's CUDA_VISIBLE_DEVICES names the child's GPU.
        command = [sys.executable, "-P", "-c", CHILD_COMMAND, str(child_sock.fileno())]
        # stdout is the LSP channel or the CLI's answer: the child's prints go to stderr
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=STDERR_FD,
                                   pass_fds=(child_sock.fileno(),), close_fds=True)
        child_sock.close()
        parent_end = Connection(parent_sock.detach())
        try:
            _send(parent_end, {"factory": self._factory_spec, "args": self._factory_args,
                               "attributes": self._attributes, "concurrency": self.concurrency})
            first = _receive(parent_end)
        except (EOFError, OSError, ValueError):
            _stop(process, parent_end)
            raise EngineCrashed(exit_cause(process.returncode), f"loading {self.label}") from None
        if first.get("op") != "ready":
            _stop(process, parent_end)
            raise EngineLoadFailed(str(first.get("message", "the engine process could not load the model")))
        return _Child(process, parent_end, first.get("describe"))

    def _install(self, child: _Child) -> bool:
        """Make child the one requests go to, with its reader; False once closed."""
        with self._lock:
            if self._closed:
                return False
            self._child, self.child_description = child, child.description
            child.reader = threading.Thread(target=self._read_answers, args=(child,),
                                            name="codecomplete-engine-reader", daemon=True)
        child.reader.start()
        return True

    def _read_answers(self, child: _Child) -> None:
        """The reader thread of one child: each answer to its caller, cancellations to the
        child, and a dead or hung child handled as a crash."""
        next_check = 0.0
        waiting: list[_Waiting] = []
        try:
            while not child.stopping:
                with child.lock:
                    busy = bool(child.waiting)
                # a dead child closes its end of the socket: readable, then EOFError in _receive
                ready = wait([child.conn, child.wake_r], timeout=CANCEL_POLL_S if busy else None)
                if child.wake_r in ready:
                    os.read(child.wake_r, 4096)
                if child.conn in ready:
                    child.deliver(_receive(child.conn))
                now = time.monotonic()
                if busy and now >= next_check:
                    next_check = now + CANCEL_POLL_S
                    if child.overdue(now):
                        logger.error("the engine process did not answer within %.0f s of the deadline: "
                                     "killing it", HUNG_GRACE_S)
                        child.process.kill()
                        break
        except (EOFError, OSError, ValueError):  # the pipe broke or carried garbage: the child is gone
            pass
        finally:
            waiting, doing = child.finish()
            try:
                if not child.stopping:
                    self._crashed(child, doing)  # the state changes before the callers hear of it
            finally:
                _release(waiting)

    def _crashed(self, child: _Child, while_doing: str) -> None:
        """One error in the log, status "restarting", a restart in the background."""
        with self._lock:
            if self._closed or child is not self._child:
                return  # the engine was closed or replaced
            self._child = None
        process = child.process
        _stop(process, None)
        cause = exit_cause(process.returncode)
        with self._lock:
            self._crashes += 1
            self.last_crash = cause
            crashes = self._crashes
        if not self._restart_after_crash:
            logger.error("the model runtime crashed (%s) while %s", cause, while_doing)
            self._set_state("error", f"the model runtime crashed ({cause})")
            return
        if crashes > MAX_RESTARTS:
            self._give_up(cause)
            return
        logger.error("the model runtime crashed (%s) while %s: answered empty, restarting the engine "
                     "(restart %d of at most %d in a row)", cause, while_doing, crashes, MAX_RESTARTS)
        self._set_state("restarting", f"the model runtime crashed ({cause}); restarting the engine")
        threading.Thread(target=self._restart, args=(crashes,), name="codecomplete-engine-restart", daemon=True).start()

    def _restart(self, attempt: int) -> None:
        while True:
            time.sleep(RESTART_PAUSES_S[min(attempt, len(RESTART_PAUSES_S)) - 1])
            if self._closed:
                return
            t0 = time.perf_counter()
            try:
                child = self._start_child()
            except EngineCrashed as e:
                with self._lock:
                    self._crashes += 1
                    attempt = self._crashes
                    self.last_crash = e.cause
                if attempt > MAX_RESTARTS:
                    self._give_up(e.cause)
                    return
                logger.error("%s: trying again (restart %d of at most %d)", e, attempt, MAX_RESTARTS)
                continue
            except Exception as e:  # the model no longer loads: nothing to retry
                logger.error("the engine could not be restarted: %s", e)
                self._set_state("error", f"the engine could not be restarted: {e}")
                return
            if not self._install(child):  # closed meanwhile
                child.finish()
                _stop(child.process, None)
                return
            logger.info("engine restarted in %.0f ms", (time.perf_counter() - t0) * 1000.0)
            self._set_state("ready", f"engine restarted after a crash ({self.last_crash})")
            return

    def _give_up(self, cause: str) -> None:
        message = (f"the engine keeps crashing ({cause}, {MAX_RESTARTS + 1} times in a row): completions are off; "
                   "change the model or runtime setting, or restart the language server")
        logger.error("%s", message)
        self._set_state("error", message)


def _stop(process: subprocess.Popen | None, conn: Connection | None) -> None:
    """Close the pipe (a healthy child exits on EOF), then make sure the process is gone."""
    if conn is not None:
        conn.close()
    if process is None:
        return
    try:
        process.wait(0.5)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(2.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def factory_spec(factory: Callable[..., Any]) -> str:
    """'module:qualname' of a module-level callable, checked to import back to itself."""
    spec = f"{getattr(factory, '__module__', '')}:{getattr(factory, '__qualname__', '')}"
    try:
        found = import_by_name(spec)
    except (ImportError, AttributeError, ValueError):
        found = None
    if found is not factory:
        raise TypeError(f"an isolated engine's factory must be a module-level callable, not {factory!r}")
    return spec


CHILD_COMMAND = "import sys; from codecomplete.isolation import child_main; child_main(sys.argv[1:])"


class IsolatedFactory:
    """An EngineFactory whose engines live in a child process: the wrapped factory (a
    module-level callable) runs there with the same (model, runtime, device)."""

    def __init__(self, factory: Callable[[str | None, str, str], Any]):
        self.factory = factory

    def __call__(self, model: str | None, runtime: str, device: str) -> ProcessEngine:
        return ProcessEngine(self.factory, (model, runtime, device), label=model or "the default model")


__all__ = ["ProcessEngine", "EngineStatus", "IsolatedFactory", "EngineCrashed", "EngineLoadFailed", "exit_cause", "MAX_RESTARTS"]
