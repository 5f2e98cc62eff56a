"""The completion pipeline. One keystroke reads top to bottom, each step in its module:

    request   (request.py)  CompletionRequest: document, cursor, options, deadline, cancel
    -> text       (text.py)       size limit, window around the cursor, cleaning
    -> scope      (scope.py)      single line or block, and the stop rule that follows
    -> prompt     (prompt.py)     FIM tokens within budget, with alignment's back-off
                                  (alignment.py)
    -> prefill / reuse (reuse.py) the runtime's prefill, or the last keystroke's KV,
                                  logits and decode trace
    -> step loop  (sampling.py)   N branches stepped together; sampler.py picks tokens,
                                  alignment masks them, the scope's stop cuts each once
    -> post-process (postprocess.py) loops, retyped suffix, whitespace, duplicates
    -> rerank     (rerank.py)     tree-sitter checks and the final order
    -> Completion (request.py), which lsp/items.py turns into LSP items in that order

The engine knows nothing about LSP and never imports torch or onnxruntime itself.

batching "off" (a laptop, an editor): one request at a time. "on" (a team server's GPU
replica): complete() may be called from many threads at once; each request runs this same
pipeline in its own thread, while its runtime calls go to one scheduler thread that runs
all waiting decode steps as one batch (batching.py). Requests for one document take turns.
"""

from __future__ import annotations

import gc
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from codecomplete.alignment import Alignment, VocabTrie, back_off_tokens
from codecomplete.batching import (
    GATHER_MS,
    PREFILL_CHUNK_TOKENS,
    BatchScheduler,
    DocumentTurns,
    PrefillStopped,
    ScheduledRuntime,
)
from codecomplete.cache import ContextCache, SuggestionCache
from codecomplete.languages import language_for
from codecomplete.postprocess import clean_candidates
from codecomplete.prompt import PromptBuilder
from codecomplete.request import Candidate, Completion, CompletionRequest
from codecomplete.rerank import rerank
from codecomplete.rerank_pool import RerankPool, default_rerank_workers
from codecomplete.reuse import KeptContext, Prefilled, Reuse, reuse_last
from codecomplete.runtime import Runtime, load_runtime
from codecomplete.sampler import Sampler
from codecomplete.sampling import DecodeLoop, GenerationResult, run
from codecomplete.scope import CompletionScope, decide_scope
from codecomplete.text import windowed_request

SINGLE_LINE_MAX_NEW_TOKENS = 48  # single-line completions rarely need more; blocks may use all
BATCHING_MODES = ("off", "on")
CACHED_DOCUMENTS = 64  # with batching: documents whose prompt KV is kept (one per typist)


@dataclass
class _Decoding:
    """A request's token choice (its sampler, over its alignment) and stop rules."""

    sampler: Sampler
    stop_ids: set[int]
    stop_bytes: object  # visible bytes -> bytes to keep, or None
    patience: int | None
    deadline: float | None


@dataclass
class _Timer:
    timings: dict

    def stage(self, name: str, t0: float) -> float:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + (now - t0) * 1000.0
        return now


def settle_collector() -> None:
    """Move the objects alive once an engine is built (the tokenizer's tables, the vocabulary
    trie, the runtime's) into the garbage collector's permanent generation, after one last
    collection. A full collection otherwise walks them all: 60 ms for a 152k-token
    vocabulary's engine, and every request waits meanwhile (it held every typist of a batch
    ~100 ms, the slowest keystrokes at 32 typists). Objects made later are collected as
    before."""
    gc.collect()
    gc.freeze()


class Engine:
    """Turns CompletionRequests into ranked Completions with one runtime.

    batching: "off" runs one request at a time (callers from several threads queue); "on"
    runs concurrent requests together through a BatchScheduler (prefill_chunk_tokens: the
    prompt tokens prefilled between two decode steps; gather_ms: how long a step waits for the requests of the last
    one to come back; drive_loops: the scheduler thread steps each request's decode loop, else
    the request's thread does, one decode call a step). cached_documents: prompt KV states
    kept, one per document, another document's handed out only when all are in use (default:
    CACHED_DOCUMENTS with batching; without, a laptop's two, which double as recycled
    buffers). rerank_workers: processes that run the reranker's tree-sitter checks, off the
    GIL the scheduler needs (None: default_rerank_workers, none without batching; 0: in
    the request's thread). fuse_prefill: with batching, a newcomer's prompt chunk rides the
    others' decode step where the runtime can (the CUDA graphs), else it runs between two
    steps. close() stops the scheduler and those processes."""

    def __init__(self, runtime: Runtime, batching: str = "off", prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS,
                 cached_documents: int | None = None, gather_ms: float = GATHER_MS, drive_loops: bool = True,
                 rerank_workers: int | None = None, fuse_prefill: bool = True):
        if batching not in BATCHING_MODES:
            raise ValueError(f"unknown batching {batching!r} ({', '.join(BATCHING_MODES)})")
        self.runtime = runtime
        self.batching = batching
        self.trie = VocabTrie(runtime.tokenizer.token_bytes)
        self.prompts = PromptBuilder(runtime.tokenizer, runtime.config, self.trie)
        if batching == "on":
            self.scheduler: BatchScheduler | None = BatchScheduler(runtime, prefill_chunk_tokens=prefill_chunk_tokens,
                                                                   gather_ms=gather_ms, drive_loops=drive_loops,
                                                                   fuse_prefill=fuse_prefill)
            self._documents = DocumentTurns()
            cached_documents = cached_documents or CACHED_DOCUMENTS
        else:
            self.scheduler = None
            self._one_at_a_time = threading.Lock()
        self.contexts = (ContextCache(size=cached_documents, others_when_full=True) if cached_documents
                         else ContextCache())
        if rerank_workers is None:
            rerank_workers = default_rerank_workers(batching)
        if rerank_workers < 0:
            raise ValueError(f"rerank_workers must be 0 or more, not {rerank_workers}")
        self.rerank_pool = RerankPool(rerank_workers) if rerank_workers else None
        self._running = 0  # requests inside complete(): a lone one reranks in place (no process hop)
        self._running_lock = threading.Lock()
        # reuse what the last keystroke computed: the logits of an unchanged prompt, the KV and
        # logits of the branches it decoded (off only to measure what that saves)
        self.reuse_keystrokes = True
        # benchmarks only: every keystroke runs the model (no typing-as-suggested answer) and
        # decodes exactly this many tokens (no stop rule, patience or deadline ends it), so
        # each does the same work, whatever the weights
        self.exact_new_tokens: int | None = None
        self._banned_with_stops: np.ndarray | None = None
        self.suggestions = SuggestionCache()
        cfg = runtime.config
        self.stop_ids = set(cfg.eos_ids) | {i for i in (cfg.fim_prefix_id, cfg.fim_suffix_id, cfg.fim_middle_id,
                                                        cfg.fim_pad_id, cfg.file_sep_id, cfg.pad_id) if i >= 0}
        # tokens with no text that are not stops (padding placeholders, unused specials)
        token_bytes = runtime.tokenizer.token_bytes
        vocab = cfg.vocab_size
        self.banned_ids = np.array([i for i in range(vocab) if (i >= len(token_bytes) or not token_bytes[i])
                                    and i not in self.stop_ids], dtype=np.int64)
        settle_collector()

    @classmethod
    def load(cls, model: str | None = None, runtime: str = "onnx", device: str = "cpu",
             precision: str = "auto", threads: int | None = None, batching: str = "off", **settings) -> Engine:
        """Load a model (None: the shipped default) into a runtime and wrap it (settings:
        the batching ones of Engine)."""
        if batching not in BATCHING_MODES:  # before the model loads
            raise ValueError(f"unknown batching {batching!r} ({', '.join(BATCHING_MODES)})")
        return cls(load_runtime(model, runtime=runtime, device=device, precision=precision, threads=threads),
                   batching=batching, **settings)

    def close(self) -> None:
        """Stop the batch scheduler's thread and the rerank processes, and give the objects
        frozen since this engine was built back to the collector (settle_collector), so that
        an engine dropped after close is collected whole, cycles too."""
        if self.scheduler is not None:
            self.scheduler.close()
        if self.rerank_pool is not None:
            self.rerank_pool.close()
        gc.unfreeze()

    def forget(self) -> None:
        """Drop what earlier requests left behind (prompt KV states, shown candidates), so the
        next answer depends on its request alone: a reused KV prefix changes float rounding."""
        self.contexts.clear()
        self.suggestions.clear()
        self.prompts.forget()

    def describe(self) -> dict:
        return {**self.runtime.describe(), "params_m": round(self.runtime.config.n_params() / 1e6, 1),
                "batching": self.batching, "rerank_workers": self.rerank_pool.workers if self.rerank_pool else 0}

    # -- the pipeline -----------------------------------------------------------------
    def complete(self, request: CompletionRequest) -> Completion:
        t_start = time.perf_counter()
        decode_deadline = request.decode_deadline(time.monotonic())  # stamped once, here if not before
        if not 0 <= request.offset <= len(request.text):
            raise ValueError(f"cursor offset {request.offset} is outside the document (0..{len(request.text)})")
        request = windowed_request(request)
        if request is None:  # too big or binary: no completion (and no error)
            return Completion([], {"total": 0.0})
        key = request.path or "<untitled>"
        with self._running_lock:
            self._running += 1
        try:
            with self._turn(key):
                return self._complete(request, key, t_start, decode_deadline)
        finally:
            with self._running_lock:
                self._running -= 1

    def _turn(self, key: str):
        """Held while a request runs: the engine's one turn without batching, its document's with."""
        return self._one_at_a_time if self.scheduler is None else self._documents.turn(key)

    @contextmanager
    def _runtime_for(self, request: CompletionRequest, decode_deadline: float | None):
        """The runtime this request calls: the engine's own, or its view through the scheduler
        (closed when the request's model work is done, so the batch stops waiting for it)."""
        if self.scheduler is None:
            yield self.runtime
            return
        session = self.scheduler.session(lambda: request.cancel.cancelled, decode_deadline)
        try:
            yield session
        finally:
            session.close()

    def _complete(self, request: CompletionRequest, key: str, t_start: float, decode_deadline: float) -> Completion:
        opts = request.options
        timer = _Timer({})
        lang = language_for(request.language, request.path)
        prefix, suffix = request.prefix, request.suffix

        cached = self.suggestions.lookup(key, prefix, suffix) if not self.exact_new_tokens else None
        if cached:
            timer.stage("cache", t_start)
            timer.timings["total"] = timer.timings["cache"]
            return Completion(cached[: opts.n], timer.timings, cached=True)

        t = time.perf_counter()
        scope = decide_scope(prefix, suffix, lang, opts.multiline)
        max_new = opts.max_new_tokens if scope.multiline else min(opts.max_new_tokens, SINGLE_LINE_MAX_NEW_TOKENS)
        exact = self.exact_new_tokens
        prompt = self.prompts.build(request, exact or max_new + back_off_tokens(opts))
        t = timer.stage("prompt", t)

        with self._runtime_for(request, None if exact else decode_deadline) as runtime:
            previous = self.contexts.take(key, prompt.tokens)
            alignment = Alignment(prompt.back_off.removed, self.trie)
            decoding = self._decoding(request, alignment, scope, decode_deadline)
            if isinstance(runtime, ScheduledRuntime) and alignment.trie is not None:
                # a prompt that rides the decode batch brings back its first pick's logits too
                runtime.first_gather = decoding.sampler.constrained_ids(alignment.removed, runtime.config.vocab_size)
            try:
                kept, reuse = self._prefill(runtime, prompt.tokens, previous)
            except PrefillStopped as stopped:  # cancelled or late while its prefill waited its turn
                self._keep_stopped(key, stopped, previous)
                timer.stage("prefill", t)
                timer.timings["total"] = (time.perf_counter() - t_start) * 1000.0
                return Completion([], timer.timings, cancelled=request.cancel.cancelled)
            t = timer.stage("prefill", t)

            result = self._generate(runtime, kept, decoding, request, exact or max_new + prompt.back_off.removed_tokens,
                                    reuse)
        kept.trace = result.trace  # the next keystroke may continue along a branch
        self.contexts.put(key, kept)
        t = timer.stage("generate", t)
        timer.timings["alignment"] = result.constraint_ms

        candidates = self._to_candidates(result, alignment, scope)
        candidates = clean_candidates(candidates, prefix, suffix, scope)
        t = timer.stage("postprocess", t)
        if opts.rerank:
            # in a worker process while other requests run (their scheduler needs the GIL that
            # tree-sitter holds); a lone request saves the hop
            pooled = self.rerank_pool is not None and lang is not None and candidates and self._running > 1
            texts = [c.text for c in candidates]
            reports = self.rerank_pool.reports(prefix, suffix, lang, texts, key) if pooled else None
            candidates = rerank(candidates, prefix, suffix, lang, reports=reports, doc=key)
        else:
            candidates.sort(key=lambda c: -c.logprob)
            for c in candidates:
                c.score = c.logprob
        timer.stage("rerank", t)
        timer.timings["total"] = (time.perf_counter() - t_start) * 1000.0
        cancelled = request.cancel.cancelled
        if not cancelled:
            self.suggestions.put(key, prefix, suffix, candidates)
        state = kept.state
        return Completion(candidates, timer.timings, tokens_generated=result.tokens_generated,
                          model_calls=int(state.new_tokens > 0) + result.steps, prefill_reused_tokens=state.reused_tokens,
                          prefill_new_tokens=state.new_tokens, prefill_adopted_tokens=state.adopted_tokens,
                          cancelled=cancelled,
                          decode_rows=result.rows_decoded, branch_rows=result.branch_rows)

    # -- stages ---------------------------------------------------------------------------
    def _prefill(self, runtime: Runtime, tokens: list[int], previous: KeptContext | None) -> Prefilled:
        """The prompt's KV and last logits, and what the decode may reuse of the last request."""
        if self.reuse_keystrokes and previous is not None:
            reused = reuse_last(runtime, tokens, previous)
            if reused is not None:
                return reused
        state, logits = runtime.prefill(tokens, previous.state if previous is not None else None)
        return Prefilled(KeptContext(state, logits), None)

    def _keep_stopped(self, key: str, stopped: PrefillStopped, previous: KeptContext | None) -> None:
        """What a stopped prefill computed is this document's state for its next request."""
        if stopped.state is not None:
            self.contexts.put(key, KeptContext(stopped.state, stopped.logits))
        elif previous is not None:  # nothing computed: the state taken is untouched
            self.contexts.put(key, previous)

    def _decoding(self, request: CompletionRequest, alignment: Alignment, scope: CompletionScope,
                  deadline: float) -> _Decoding:
        """The request's token choice and stop rules."""
        opts = request.options
        banned = self.banned_ids
        stop_ids, stop_bytes, patience = self.stop_ids, scope.stop_bytes, opts.patience_steps
        if self.exact_new_tokens:  # the fixed-length benchmark mode: nothing stops a branch early
            if self._banned_with_stops is None:  # one array for every request: a batch bans it once
                with self._running_lock:  # (requests arriving together must not each make their own:
                    # a loop banning another array than its batch's gets whole rows, every step)
                    if self._banned_with_stops is None:
                        self._banned_with_stops = np.union1d(banned, np.array(sorted(stop_ids), dtype=np.int64))
            banned = self._banned_with_stops
            stop_ids, stop_bytes, patience, deadline = set(), _never_stop, None, None
        sampler = Sampler(temperature=opts.temperature, top_p=opts.top_p, seed=opts.seed,
                          banned=banned if len(banned) else None, alignment=alignment)
        return _Decoding(sampler, stop_ids, stop_bytes, patience, deadline)

    @staticmethod
    def _generate(runtime: Runtime, kept: KeptContext, decoding: _Decoding, request: CompletionRequest, max_new: int,
                  reuse: Reuse | None) -> GenerationResult:
        sampler = decoding.sampler
        loop = DecodeLoop(runtime, kept.state, kept.logits, n=max(1, request.options.n), max_new_tokens=max_new,
                          alignment=sampler.alignment, sampler=sampler, stop_ids=decoding.stop_ids,
                          stop_bytes=decoding.stop_bytes, deadline=decoding.deadline,
                          cancelled=lambda: request.cancel.cancelled, patience=decoding.patience, reuse=reuse)
        return run(loop)

    @staticmethod
    def _to_candidates(result: GenerationResult, alignment: Alignment, scope: CompletionScope) -> list[Candidate]:
        out = []
        for b in result.branches:
            visible = alignment.visible(bytes(b.data))
            if visible is None:
                continue  # stopped before re-creating the typed text: nothing to show
            if b.cut_bytes >= 0:
                visible = visible[: b.cut_bytes]
            text = scope.finish(visible.decode("utf-8", errors="ignore"), b.stop_reason)
            if text is None:
                continue
            out.append(Candidate(text=text, logprob=b.logprob_sum / max(1, b.scored_tokens),
                                 tokens=len(b.tokens), stop_reason=b.stop_reason or ""))
        return out


def _never_stop(visible: bytes) -> None:
    return None


__all__ = ["BATCHING_MODES", "Engine"]
