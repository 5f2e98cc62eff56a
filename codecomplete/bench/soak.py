"""Soak: type through the real server at a fixed pace for a while; latency drift, RSS, backlog.

    codecomplete bench soak --rate 15 --seconds 60 --json

Each keystroke is a didChange plus a textDocument/inlineCompletion request, sent on a fixed
clock whatever the answers do (an editor does not wait). A newer request supersedes the
older one, which then gets an empty answer. Reported: requests, answered (with items),
empty (superseded or nothing to offer), errors, unanswered, p50/p95 latency overall and in
the first and last third of the run, server RSS after loading and at the end, and whether
a backlog built up (answers later than --lag-ms after the next keystroke).
RawServer, the small stdio client used here, also serves the reliability tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from codecomplete.bench.common import TYPING_SAMPLE, emit, percentile, progress
from codecomplete.runtime import DEVICES, RUNTIMES

DEFAULT_FILE = TYPING_SAMPLE


# -- a raw stdio client -------------------------------------------------------------------------
def frame(body: bytes) -> bytes:
    """One LSP message: Content-Length header, then the body."""
    return f"Content-Length: {len(body)}\r\n\r\n".encode("ascii") + body


class RawServer:
    """The server as a subprocess, spoken to in raw bytes; every message it sends is kept."""

    def __init__(self, args: list[str], env: dict | None = None):
        cmd = [sys.executable, "-P", "-m", "codecomplete.lsp", *args]  # -P: no checkout folder shadows the package
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)
        self.pid = self.proc.pid
        self.responses: dict[Any, tuple[float, dict]] = {}  # id -> (arrival perf_counter, message)
        self.notifications: list[dict] = []
        self.eof = False  # the server closed its stdout (exited)
        self.stdout_garbage: list[bytes] = []  # anything on stdout that is not a framed JSON message
        self.stderr_lines: list[str] = []
        self._cond = threading.Condition()
        self._lock = threading.Lock()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    # -- reading ------------------------------------------------------------------------
    def _read_stdout(self) -> None:
        out = self.proc.stdout
        while True:
            length = None
            while True:
                line = out.readline()
                if not line:
                    with self._cond:
                        self.eof = True
                        self._cond.notify_all()
                    return
                if line in (b"\r\n", b"\n"):
                    break
                name, _, value = line.decode("ascii", "replace").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
                elif name.strip().lower() != "content-type":
                    self.stdout_garbage.append(line)
            if length is None:
                continue
            body = out.read(length)
            try:
                message = json.loads(body)
            except ValueError:
                self.stdout_garbage.append(body)
                continue
            with self._cond:
                if "id" in message and "method" not in message:
                    self.responses[message["id"]] = (time.perf_counter(), message)
                else:
                    self.notifications.append(message)
                    if "id" in message:  # a request to the client (progress, configuration): answer null
                        self.send({"jsonrpc": "2.0", "id": message["id"], "result": None})
                self._cond.notify_all()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr_lines.append(line.decode("utf-8", "replace"))

    # -- writing ------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        with self._lock:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    def send(self, message: Any) -> None:
        self.write(frame(json.dumps(message).encode("utf-8")))

    def request(self, msg_id: Any, method: str, params: Any = None) -> None:
        self.send({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})

    def notify(self, method: str, params: Any = None) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    # -- waiting ------------------------------------------------------------------------
    def wait_for(self, predicate, timeout_s: float) -> bool:
        """Wait until predicate() holds (checked under the lock) or the server's stdout closes."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0 or self.eof:
                    return False
                self._cond.wait(min(left, 0.1))
            return True

    def response(self, msg_id: Any, timeout_s: float = 10.0) -> dict | None:
        if self.wait_for(lambda: msg_id in self.responses, timeout_s):
            return self.responses[msg_id][1]
        return None

    def status_state(self) -> str | None:
        states = [n["params"].get("state") for n in self.notifications
                  if n.get("method") == "codecomplete/status" and isinstance(n.get("params"), dict)]
        return next((s for s in reversed(states) if s in ("ready", "error")), None)

    def initialize(self, settings: dict | None = None, timeout_s: float = 300.0) -> str | None:
        """initialize + initialized; wait for the model's ready/error status and return it."""
        self.request("init", "initialize", {"processId": None, "capabilities": {},
                                            "initializationOptions": {"codecomplete": settings or {}}})
        if self.response("init", timeout_s) is None:
            raise TimeoutError("no answer to initialize")
        self.notify("initialized", {})
        self.wait_for(lambda: self.status_state() is not None, timeout_s)
        return self.status_state()

    def rss_mb(self) -> float:
        """The server's resident set size in MiB (Linux /proc; NaN where unknown)."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024.0
        except OSError:
            pass
        return float("nan")

    def close(self, timeout_s: float = 10.0) -> int | None:
        """shutdown + exit; kill it if it does not go. Returns the exit code (None if killed)."""
        try:
            if self.proc.poll() is None:
                self.request("shutdown-final", "shutdown")
                self.response("shutdown-final", timeout_s)
                self.notify("exit")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


# -- the soak -----------------------------------------------------------------------------------
def _position(text: str, offset: int) -> dict:
    """UTF-16 LSP position of a character offset."""
    line = text.count("\n", 0, offset)
    line_start = text.rfind("\n", 0, offset) + 1
    character = len(text[line_start:offset].encode("utf-16-le")) // 2
    return {"line": line, "character": character}


def _window_stats(latencies: list[float]) -> dict:
    return {"requests": len(latencies), "p50_ms": round(percentile(latencies, 50), 1),
            "p95_ms": round(percentile(latencies, 95), 1)}


def soak(file: str | Path, language: str = "python", rate_hz: float = 15.0, seconds: float = 60.0, *,
         model: str | None = None, runtime: str = "onnx", device: str = "cpu", candidates: int = 4,
         max_tokens: int = 16, deadline_ms: int = 1000, lag_ms: float = 1000.0,
         engine_factory: str | None = None, env: dict | None = None) -> dict[str, Any]:
    """Type `rate_hz * seconds` characters of a file through a fresh server; figures as a dict."""
    source = Path(file).read_text(encoding="utf-8")
    keystrokes = max(1, int(rate_hz * seconds))
    typed = (source * (keystrokes // max(len(source), 1) + 1))[:keystrokes]
    args = ["--runtime", runtime, "--device", device, "--log-level", "WARNING"]
    if model:
        args += ["--model", str(model)]
    if engine_factory:
        args += ["--engine-factory", engine_factory]
    server = RawServer(args, env=env)
    t_load = time.perf_counter()
    try:
        state = server.initialize({"candidates": candidates, "maxTokens": max_tokens, "deadlineMs": deadline_ms})
        load_ms = (time.perf_counter() - t_load) * 1000.0
        if state != "ready":
            raise RuntimeError(f"the server did not load the model: {''.join(server.stderr_lines[-5:])}")
        uri = Path(file).resolve().as_uri()
        text = source[:len(source) // 2]  # type into the middle of the file, after a line start
        text = text[:text.rfind("\n") + 1]
        server.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": language,
                                                                "version": 1, "text": text}})
        rss_start_mb = server.rss_mb()
        interval_s = 1.0 / rate_hz
        sent: list[float] = []
        t0 = time.perf_counter()
        for i, ch in enumerate(typed):
            target = t0 + i * interval_s
            delay = target - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pos = _position(text, len(text))
            text += ch
            server.notify("textDocument/didChange", {
                "textDocument": {"uri": uri, "version": i + 2},
                "contentChanges": [{"range": {"start": pos, "end": pos}, "text": ch}]})
            sent.append(time.perf_counter())
            server.request(i, "textDocument/inlineCompletion", {
                "textDocument": {"uri": uri}, "position": _position(text, len(text)),
                "context": {"triggerKind": 2}})
        wall_s = time.perf_counter() - t0
        server.wait_for(lambda: len(server.responses) >= keystrokes + 1, deadline_ms / 1000.0 + lag_ms / 1000.0 + 5.0)
        rss_end_mb = server.rss_mb()
        alive = server.proc.poll() is None
    finally:
        exit_code = server.close()
    counts = {"answered": 0, "empty": 0, "errors": 0, "unanswered": 0, "late": 0}
    latencies: list[float] = []
    for i, t_sent in enumerate(sent):
        if i not in server.responses:
            counts["unanswered"] += 1
            continue
        t_answer, message = server.responses[i]
        latencies.append((t_answer - t_sent) * 1000.0)
        next_keystroke = sent[i + 1] if i + 1 < len(sent) else t_sent + interval_s
        if (t_answer - next_keystroke) * 1000.0 > lag_ms:
            counts["late"] += 1
        if "error" in message:
            counts["errors"] += 1
        elif (message.get("result") or {}).get("items"):
            counts["answered"] += 1
        else:
            counts["empty"] += 1
    third = max(1, len(latencies) // 3)
    return {
        "file": str(file), "model": model or "default", "runtime": runtime, "device": device,
        "engine_factory": engine_factory, "rate_hz": rate_hz, "seconds": seconds, "wall_s": round(wall_s, 2),
        "candidates": candidates, "max_tokens": max_tokens, "deadline_ms": deadline_ms, "lag_ms": lag_ms,
        "load_ms": round(load_ms, 1), "requests": len(sent), **counts,
        "p50_ms": round(percentile(latencies, 50), 1), "p95_ms": round(percentile(latencies, 95), 1),
        "max_ms": round(max(latencies), 1) if latencies else float("nan"),
        "first_third": _window_stats(latencies[:third]), "last_third": _window_stats(latencies[-third:]),
        "rss_start_mb": round(rss_start_mb, 1), "rss_end_mb": round(rss_end_mb, 1),
        "rss_growth_mb": round(rss_end_mb - rss_start_mb, 1),
        "backlog": counts["unanswered"] > 0 or counts["late"] > 0.05 * len(sent),
        "server_alive_at_end": alive, "exit_code": exit_code, "stdout_garbage": len(server.stdout_garbage),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", default=str(DEFAULT_FILE), help="source file to type through")
    p.add_argument("--language", default="python", help="LSP languageId")
    p.add_argument("--rate", type=float, default=15.0, help="keystrokes per second")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--model", default=None)
    p.add_argument("--runtime", default="onnx", choices=RUNTIMES)
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--n", type=int, default=4, help="candidates")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--deadline-ms", type=int, default=1000)
    p.add_argument("--lag-ms", type=float, default=1000.0,
                   help="an answer later than this after the next keystroke counts as late (backlog)")
    p.add_argument("--engine-factory", default=None, metavar="MODULE:NAME", help="for tests: a fake engine")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    progress(f"soak: {args.seconds:.0f} s at {args.rate:g} keys/s through the server")
    result = soak(args.file, args.language, args.rate, args.seconds, model=args.model, runtime=args.runtime,
                  device=args.device, candidates=args.n, max_tokens=args.max_tokens, deadline_ms=args.deadline_ms,
                  lag_ms=args.lag_ms, engine_factory=args.engine_factory, env=dict(os.environ))
    emit(result, args.json)
    return 0 if result["server_alive_at_end"] and not result["backlog"] else 1
