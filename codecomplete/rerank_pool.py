"""The reranker's tree-sitter checks in worker processes, out of the GIL's way.

A team server's GPU replica runs many requests at once in one process: their decode steps
go through one scheduler thread (batching.py), their prompts, post-processing and reranking
through their own threads. Tree-sitter's parser holds the GIL while it parses (measured:
two threads parsing take as long as one doing both), and a keystroke's checks parse the
window around the cursor once plus once per candidate: 2-5 ms of a keystroke's ~10 ms of
host work, during which the scheduler thread cannot pick the next tokens for anyone.

A RerankPool keeps a few worker processes (`python -P -m codecomplete.rerank_pool`, each
answering one request at a time over its stdin and stdout). A request's thread cuts the
window the checks read (window_texts: a few kB, whatever the file's size), hands it and the
candidates' texts to an idle worker and waits for the reports without holding the GIL; the
scores are then computed in the request's thread exactly as rerank() does in place (the
worker runs the same code). The messages are marshal'd tuples of strings and numbers.
The workers are plain subprocesses, not multiprocessing's: those re-run the parent's main
module (a Ray worker's, a test runner's) and inherit nothing they need.

Without batching (a laptop, an editor, a CPU replica) the engine reranks in place: one
request at a time gains nothing from a process hop. A worker that dies or does not answer
in time is replaced in the background, and that request (and any while no worker runs) is
checked in place; a worker that answers that one request failed stays."""

from __future__ import annotations

import collections
import logging
import marshal
import os
import queue
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

from codecomplete.languages import Language, language_for
from codecomplete.rerank import SyntaxReport, window_reports, window_texts

log = logging.getLogger(__name__)

# a worker's answer takes a few ms; far longer means it is stuck (or the machine is)
REPORT_TIMEOUT_S = 5.0
START_TIMEOUT_S = 60.0  # a worker's start: the interpreter, tree-sitter and its grammars
WORKER_MS_KEPT = 20_000  # requests whose worker time the pool keeps (bench serve reads a row's)
MAX_WORKERS_AUTO = 4
CORES_PER_WORKER_AUTO = 4  # leave most cores to the replica's own threads and the other replicas
_READY = b"ready"


def default_rerank_workers(batching: str) -> int:
    """Worker processes an Engine uses by default: none without batching; with batching a
    quarter of the machine's cores, at most 4 (none on a machine with fewer than 4)."""
    if batching != "on":
        return 0
    return min(MAX_WORKERS_AUTO, (os.cpu_count() or 1) // CORES_PER_WORKER_AUTO)


class WorkerFailed(Exception):
    """A worker died, answered garbage, or did not answer in time."""


class RequestFailed(Exception):
    """A worker answered that one request failed (the worker itself is fine)."""


class _Worker:
    """One worker process and its pipes."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, "-P", "-m", "codecomplete.rerank_pool"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, close_fds=True)
        # length-framed messages over the pipes, as the isolated engine's (isolation.py)
        self._to = Connection(os.dup(self.process.stdin.fileno()), readable=False)
        self._from = Connection(os.dup(self.process.stdout.fileno()), writable=False)
        try:
            if self._receive(START_TIMEOUT_S) != _READY:
                raise WorkerFailed("the worker did not start")
        except BaseException:
            self.stop()
            raise

    def _receive(self, timeout_s: float) -> bytes:
        if not self._from.poll(timeout_s):
            raise WorkerFailed("no answer in time")
        return self._from.recv_bytes()

    def reports(self, lang: Language, windows: tuple, texts: list[str], timeout_s: float, doc: str | None = None
                ) -> tuple[list[SyntaxReport], float]:
        """The reports and the worker's own milliseconds on them."""
        try:
            self._to.send_bytes(marshal.dumps((lang.id, windows, texts, doc)))
        except OSError as exc:
            raise WorkerFailed(f"the worker's pipe: {exc}") from None
        ok, answer, worker_ms = marshal.loads(self._receive(timeout_s))
        if not ok:
            raise RequestFailed(f"the worker failed the request: {answer}")
        return [SyntaxReport(*fields) for fields in answer], float(worker_ms)

    def stop(self) -> None:
        for stream in (self._to, self._from, self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout=2)  # its stdin closed: it exits
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class RerankPool:
    """syntax_reports in `workers` worker processes, one request per worker at a time.
    reports() blocks its caller without holding the GIL; close() stops the workers."""

    def __init__(self, workers: int, timeout_s: float = REPORT_TIMEOUT_S):
        if workers < 1:
            raise ValueError(f"a rerank pool needs at least one worker, not {workers}")
        self.workers = workers
        self.timeout_s = timeout_s
        self.in_place = 0  # requests checked in place because a worker failed them
        # the workers' own milliseconds per request answered (the rest of a request's time is
        # the pipes and its thread's wait for the GIL): what bench serve reports of the pool
        self.worker_ms: collections.deque[float] = collections.deque(maxlen=WORKER_MS_KEPT)
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        try:
            for _ in range(workers):
                self._add()
        except BaseException:
            self.close()
            raise

    def _add(self) -> None:
        """Start a worker and put it to work (stopped again if the pool closed meanwhile)."""
        worker = _Worker()
        with self._lock:
            if not self._closed:
                self._all.append(worker)
                self._idle.put(worker)
                return
        worker.stop()

    def pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._all]

    def reports(self, prefix: str, suffix: str, lang: Language, texts: list[str], doc: str | None = None
                ) -> list[SyntaxReport]:
        """The texts' syntax reports at this cursor, from a worker; in place if it fails.
        doc: a key naming the document (each worker keeps its documents' last windows'
        trees, so a typist's next keystroke reparses only what changed)."""
        if not texts:
            return []
        windows = window_texts(prefix, suffix, lang)
        worker = self._take()
        if worker is not None:
            try:
                answer, worker_ms = worker.reports(lang, windows, list(texts), self.timeout_s, doc)
            except RequestFailed as exc:  # this request's failure, not the worker's: it stays
                log.warning("rerank pool: %s (checked in place)", exc)
                self._idle.put(worker)
            except (WorkerFailed, OSError, ValueError, EOFError, TypeError) as exc:
                self._replace(worker, exc)
            else:
                self._idle.put(worker)
                self.worker_ms.append(worker_ms)
                return answer
        self.in_place += 1
        return window_reports(lang, windows, list(texts), doc)

    def _take(self) -> _Worker | None:
        """An idle worker, waiting for one while all are busy; None once the pool is closed
        or has no worker running (replacements still starting: checked in place meanwhile)."""
        while not self._closed:
            try:
                return self._idle.get(timeout=0.05)
            except queue.Empty:
                with self._lock:
                    if not self._all:
                        return None
        return None

    def _replace(self, worker: _Worker, exc: BaseException) -> None:
        """Drop a failed worker and start its replacement in the background: the request
        that found it failed is checked in place, not kept waiting for a process to start."""
        log.warning("rerank pool: %s; starting a new worker (this request is checked in place)", exc)
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)
        worker.stop()
        if not self._closed:
            threading.Thread(target=self._start_replacement, name="rerank-pool-start", daemon=True).start()

    def _start_replacement(self) -> None:
        try:
            self._add()
        except Exception:
            log.exception("rerank pool: could not start a new worker (%d left)", len(self._all))

    def close(self) -> None:
        """Stop the workers: those busy finish their request first (answered in place after)."""
        self._closed = True
        with self._lock:
            workers, self._all = self._all, []
        for worker in workers:
            worker.stop()


def _serve() -> None:
    """A worker: answer (language id, windows, texts) messages on stdin until it closes."""
    from codecomplete.languages import LANGUAGES, parser_for

    for lang in LANGUAGES:  # every grammar loaded before the first request
        try:
            parser_for(lang)
        except Exception:  # a grammar that fails to load fails its requests, in place
            pass
    requests = Connection(os.dup(0), writable=False)
    answers = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # nothing else may write into the answers
    sys.stdout = sys.stderr
    answers.send_bytes(_READY)
    while True:
        try:
            request = requests.recv_bytes()
        except (EOFError, OSError):  # stdin closed: the engine is done
            return
        t0 = time.perf_counter()
        try:
            language_id, windows, texts, doc = marshal.loads(request)
            lang = language_for(language_id)
            if lang is None:
                raise ValueError(f"unknown language {language_id!r}")
            reports = window_reports(lang, tuple(windows), list(texts), doc)
            answer = (True, [(r.ok, r.new_error_nodes, r.new_missing_nodes, r.unbalanced_brackets, r.incomplete)
                             for r in reports], (time.perf_counter() - t0) * 1000.0)
        except Exception as exc:
            answer = (False, f"{type(exc).__name__}: {exc}", 0.0)
        answers.send_bytes(marshal.dumps(answer))


if __name__ == "__main__":
    _serve()
