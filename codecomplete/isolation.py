"""The engine in a child process, so that a native crash in the model runtime (SIGSEGV,
SIGFPE, SIGKILL from the out-of-memory killer) ends the child and not the language server
or the CLI.

`ProcessEngine` has the engine's face (`complete`, `describe`, `forget`). The child is a
fresh interpreter (`python -c`, no fork of a server with threads) that gets a socket pair
and the cancel cell as inherited file descriptors; each request goes to it as JSON
(`wire.request_to_json`, length-framed by multiprocessing.connection's bytes calls) and the
answer comes back the same way, so nothing from the child is ever unpickled. The parent's CancelToken
reaches the child through one shared integer, the highest cancelled request number, that
the child's token reads between decode steps. A child that dies mid-request makes that
request answer None, logs one error naming the signal, and is restarted (the model
reloaded) in the background with growing pauses; after `MAX_RESTARTS` crashes in a row the
engine stays down in state "error" until it is replaced.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
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


class SharedCancel(CancelToken):
    """The child's CancelToken for request number `seq`: cancelled once the parent has
    written a number >= seq into the shared cell."""

    def __init__(self, cell: CancelCell, seq: int):
        super().__init__()
        self._cell, self._seq = cell, seq

    @property
    def cancelled(self) -> bool:
        return self._event.is_set() or self._cell.value >= self._seq


class CancelCell:
    """One 64-bit integer in memory shared by the parent and the child: the highest
    cancelled request number. It lives in an unlinked temporary file that both map, so
    the child gets it as an inherited file descriptor."""

    def __init__(self, fd: int | None = None):
        import mmap
        import tempfile

        if fd is None:
            self._file = tempfile.TemporaryFile()
            os.ftruncate(self._file.fileno(), 8)
            fd = self._file.fileno()
        self.fd = fd
        self._map = mmap.mmap(fd, 8)

    @property
    def value(self) -> int:
        return struct.unpack_from("q", self._map, 0)[0]

    @value.setter
    def value(self, v: int) -> None:
        struct.pack_into("q", self._map, 0, v)


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


def child_main(argv: list[str] | None = None) -> None:
    """The child: build the engine, then answer one JSON message at a time until the pipe closes.

    argv: CONNECTION_FD CANCEL_FD (the first message brings the factory and its arguments)."""
    conn_fd, cancel_fd = (int(x) for x in (argv if argv is not None else sys.argv[1:])[:2])
    _prepare_child()
    conn, cell = Connection(conn_fd), CancelCell(cancel_fd)
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
    while True:
        try:
            message = _receive(conn)
        except (EOFError, OSError):  # the parent is gone
            return
        op, seq = message.get("op"), message.get("seq", 0)
        try:
            if op == "complete":
                request = request_from_json(message.get("request"))
                request.cancel = SharedCancel(cell, seq)
                completion = engine.complete(request)
                answer = {"op": "completion", "seq": seq, "completion": completion_to_json(completion),
                          "rows": [completion.decode_rows, completion.branch_rows]}
            elif op == "forget":
                if callable(getattr(engine, "forget", None)):
                    engine.forget()
                answer = {"op": "done", "seq": seq}
            elif op == "set":
                for name, value in (message.get("attributes") or {}).items():
                    if name in SETTABLE:
                        setattr(engine, name, value)
                answer = {"op": "done", "seq": seq}
            else:
                answer = {"op": "failed", "seq": seq, "message": f"unknown operation {op!r}"}
        except Exception as e:  # a Python error in the engine: the child goes on
            answer = {"op": "failed", "seq": seq, "message": f"{type(e).__name__}: {e}"}
        _send(conn, answer)


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
class ProcessEngine(EngineStatus):
    """An engine built by `factory(*factory_args)` in a child process (a fresh interpreter that
    imports the factory by name: a module-level function, its arguments plain JSON values).
    Like the Engine, one request at a time: call it from one thread (the worker's)."""

    def __init__(self, factory: Callable[..., Any], factory_args: tuple = (), label: str = "the model",
                 restart: bool = True):
        self._factory_spec = factory_spec(factory)
        self._factory_args, self.label = json.loads(json.dumps(list(factory_args))), label
        self._restart_after_crash = restart  # False (the CLI): a crash leaves the engine in state "error"
        self._cancelled_upto = CancelCell()  # the highest cancelled request number, shared with the child
        self._seq = 0
        self._attributes: dict[str, Any] = {}  # set on the engine (SETTABLE), also after a restart
        self._lock = threading.Lock()  # guards the child's handles, state and crash count
        self._process = None
        self._conn: Connection | None = None
        self._closed = False
        self._crashes = 0
        self.last_crash = ""  # what ended the last child that died: "SIGFPE", "exit code 1", ...
        self.last_error = ""  # the last Python error the engine raised in the child
        self.state = "ready"  # ready | restarting | error
        self.child_description: Any = None
        self._process, self._conn, self.child_description = self._start_child()

    # -- the engine's face --------------------------------------------------------------
    def describe(self) -> Any:
        description = self.child_description
        if isinstance(description, dict):
            return {**description, "isolation": "process"}
        return {"engine": description, "isolation": "process"}

    def complete(self, request: CompletionRequest) -> Completion | None:
        """The child's answer; None when it crashed (it restarts) or is not running."""
        with self._lock:
            if self.state != "ready" or self._conn is None:
                return None
            process, conn = self._process, self._conn
            self._seq += 1
            seq = self._seq
        payload = outgoing_request_json(request)
        if payload is None:  # a document that gets no completions (too big, binary)
            return Completion([])
        give_up_at = time.monotonic() + payload["options"]["deadline_ms"] / 1000.0 + HUNG_GRACE_S
        try:
            _send(conn, {"op": "complete", "seq": seq, "request": payload})
            answer = self._await_answer(process, conn, seq, request.cancel, give_up_at)
        except (EOFError, OSError, ValueError):  # the pipe broke or carried garbage: the child is gone
            answer = None
        if answer is None:
            self._crashed(process, "completing a request")
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
        return self._process.pid if self._process is not None else None

    def close(self) -> None:
        """Stop the child (and any restart in progress)."""
        with self._lock:
            self._closed = True
            process, conn = self._process, self._conn
            self._process = self._conn = None
        _stop(process, conn)

    # -- the child's lifecycle ------------------------------------------------------------
    def _start_child(self):
        parent_sock, child_sock = socket.socketpair()
        cancel_fd = self._cancelled_upto.fd
        # -P: the working folder stays off sys.path, so that run from a source checkout the
        # child imports the installed package, not the checkout's codecomplete/ folder
        command = [sys.executable, "-P", "-c", CHILD_COMMAND, str(child_sock.fileno()), str(cancel_fd)]
        # stdout is the LSP channel or the CLI's answer: the child's prints go to stderr
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=STDERR_FD,
                                   pass_fds=(child_sock.fileno(), cancel_fd), close_fds=True)
        child_sock.close()
        parent_end = Connection(parent_sock.detach())
        try:
            _send(parent_end, {"factory": self._factory_spec, "args": self._factory_args,
                               "attributes": self._attributes})
            first = _receive(parent_end)
        except (EOFError, OSError, ValueError):
            _stop(process, parent_end)
            raise EngineCrashed(exit_cause(process.returncode), f"loading {self.label}") from None
        if first.get("op") != "ready":
            _stop(process, parent_end)
            raise EngineLoadFailed(str(first.get("message", "the engine process could not load the model")))
        return process, parent_end, first.get("describe")

    def _await_answer(self, process, conn: Connection, seq: int, cancel: CancelToken | None,
                      give_up_at: float) -> dict | None:
        """The child's answer to request seq; None when the child died or hung."""
        cancel_sent = False
        while True:
            # a dead child closes its end of the socket: readable, then EOFError in _receive
            if wait([conn], timeout=CANCEL_POLL_S):
                answer = _receive(conn)
                if answer.get("seq") == seq:
                    return answer
                continue  # an answer to an older request (cannot happen: one request at a time)
            if not cancel_sent and cancel is not None and cancel.cancelled:
                self._cancelled_upto.value = max(self._cancelled_upto.value, seq)
                cancel_sent = True
                give_up_at = min(give_up_at, time.monotonic() + HUNG_GRACE_S)
            if time.monotonic() > give_up_at:
                logger.error("the engine process did not answer within %.0f s of the deadline: killing it",
                             HUNG_GRACE_S)
                process.kill()
                return None

    def _call(self, message: dict) -> None:
        """A small synchronous operation (forget, set); a crash is handled like in complete."""
        with self._lock:
            if self.state != "ready" or self._conn is None:
                return
            process, conn = self._process, self._conn
            self._seq += 1
            seq = self._seq
        try:
            _send(conn, {**message, "seq": seq})
            answer = self._await_answer(process, conn, seq, None, time.monotonic() + 60.0)
        except (EOFError, OSError, ValueError):
            answer = None
        if answer is None:
            self._crashed(process, f"running {message['op']}")

    def _crashed(self, process, while_doing: str) -> None:
        """One error in the log, status "restarting", a restart in the background."""
        with self._lock:
            if self._closed or process is not self._process or self._conn is None:
                return  # already handled, or the engine was replaced
            conn, self._conn = self._conn, None
        _stop(process, conn)
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
                process, conn, description = self._start_child()
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
            with self._lock:
                if self._closed:
                    _stop(process, conn)
                    return
                self._process, self._conn, self.child_description = process, conn, description
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
