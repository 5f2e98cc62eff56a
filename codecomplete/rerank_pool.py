"""The reranker's tree-sitter checks in worker processes, out of the GIL's way.

A team server's GPU replica runs many requests at once in one process: their decode steps
go through one scheduler thread (batching.py), their prompts, post-processing and reranking
through their own threads. Tree-sitter's parser holds the GIL while it parses (measured:
two threads parsing take as long as one doing both), and a keystroke's checks parse the
window around the cursor once plus once per candidate: 2-5 ms of a keystroke's ~10 ms of
host work, during which the scheduler thread cannot pick the next tokens for anyone.
A RerankPool sends each request's texts to one of a few worker processes and waits without
the GIL; the scores are then computed in the request's thread from the reports, exactly as
rerank() does in place (same reports: the same code runs in the worker).

Without batching (a laptop, an editor, a CPU replica) the engine reranks in place: one
request at a time gains nothing from a process hop. A pool that breaks (a worker killed)
or does not answer in time is replaced, and that request is checked in place."""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import threading
from concurrent.futures.process import BrokenProcessPool

from codecomplete.languages import Language, language_for
from codecomplete.rerank import SyntaxReport, syntax_reports

log = logging.getLogger(__name__)

# a worker's answer takes a few ms; far longer means it is stuck (or the machine is)
REPORT_TIMEOUT_S = 5.0
MAX_WORKERS_AUTO = 4
CORES_PER_WORKER_AUTO = 4  # leave most cores to the replica's own threads and the other replicas


def default_rerank_workers(batching: str) -> int:
    """Worker processes an Engine uses by default: none without batching; with batching a
    quarter of the machine's cores, at most 4 (none on a machine with fewer than 4)."""
    if batching != "on":
        return 0
    return min(MAX_WORKERS_AUTO, (os.cpu_count() or 1) // CORES_PER_WORKER_AUTO)


def _start_worker() -> None:
    """Load every grammar before the first request (each takes a few ms to load)."""
    from codecomplete.languages import LANGUAGES, parser_for

    for lang in LANGUAGES:
        try:
            parser_for(lang)
        except Exception:  # a grammar that fails to load fails its requests, in place
            pass


def _worker_reports(prefix: str, suffix: str, language_id: str, texts: list[str]) -> list[SyntaxReport]:
    lang = language_for(language_id)
    if lang is None:
        raise ValueError(f"unknown language {language_id!r}")
    return syntax_reports(prefix, suffix, lang, texts)


def _ready() -> int:
    return os.getpid()


class RerankPool:
    """syntax_reports in `workers` processes (forkserver where there is one, else spawn:
    never fork a process that holds CUDA or threads). reports() blocks its caller without
    holding the GIL; close() stops the workers."""

    def __init__(self, workers: int, timeout_s: float = REPORT_TIMEOUT_S):
        if workers < 1:
            raise ValueError(f"a rerank pool needs at least one worker, not {workers}")
        self.workers = workers
        self.timeout_s = timeout_s
        self.in_place = 0  # requests checked in place because the pool failed them
        self._lock = threading.Lock()
        self._closed = False
        methods = multiprocessing.get_all_start_methods()
        self._context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            # the server imports only this module's needs, not the parent's __main__ (a Ray
            # worker, a test runner)
            self._context.set_forkserver_preload(["codecomplete.rerank_pool"])
        self._executor = self._start()

    def _start(self) -> concurrent.futures.ProcessPoolExecutor:
        executor = concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=self._context,
                                                          initializer=_start_worker)
        # start every worker now (the pool starts them one per waiting task, on demand)
        for future in [executor.submit(_ready) for _ in range(self.workers)]:
            future.result(timeout=60)
        return executor

    def reports(self, prefix: str, suffix: str, lang: Language, texts: list[str]) -> list[SyntaxReport]:
        """The texts' syntax reports at this cursor, from a worker; in place if the pool fails."""
        if not texts:
            return []
        executor = self._executor
        if not self._closed:
            try:
                future = executor.submit(_worker_reports, prefix, suffix, lang.id, list(texts))
                return future.result(timeout=self.timeout_s)
            except (BrokenProcessPool, concurrent.futures.TimeoutError, OSError) as exc:
                self._replace(executor, exc)
            except RuntimeError as exc:  # submit after close(): shut down meanwhile
                if not self._closed:
                    self._replace(executor, exc)
        self.in_place += 1
        return syntax_reports(prefix, suffix, lang, texts)

    def _replace(self, broken: concurrent.futures.ProcessPoolExecutor, exc: BaseException) -> None:
        with self._lock:
            if self._closed or self._executor is not broken:  # another request replaced it already
                return
            log.warning("rerank pool: %s; starting new workers (this request is checked in place)",
                        type(exc).__name__)
            broken.shutdown(wait=False, cancel_futures=True)
            try:
                self._executor = self._start()
            except Exception:
                log.exception("rerank pool: could not start new workers; reranking in place from now on")
                self._closed = True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._executor.shutdown(wait=True, cancel_futures=True)
