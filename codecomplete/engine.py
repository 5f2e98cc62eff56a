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
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from codecomplete.alignment import Alignment, VocabTrie, back_off_tokens
from codecomplete.cache import ContextCache, SuggestionCache
from codecomplete.languages import language_for
from codecomplete.postprocess import clean_candidates
from codecomplete.prompt import PromptBuilder
from codecomplete.request import Candidate, Completion, CompletionRequest
from codecomplete.rerank import rerank
from codecomplete.reuse import KeptContext, Prefilled, Reuse, reuse_last
from codecomplete.runtime import Runtime, load_runtime
from codecomplete.sampler import Sampler
from codecomplete.sampling import DecodeLoop, GenerationResult, run
from codecomplete.scope import CompletionScope, decide_scope
from codecomplete.text import windowed_request

SINGLE_LINE_MAX_NEW_TOKENS = 48  # single-line completions rarely need more; blocks may use all


@dataclass
class _Timer:
    timings: dict

    def stage(self, name: str, t0: float) -> float:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + (now - t0) * 1000.0
        return now


class Engine:
    """Turns CompletionRequests into ranked Completions with one runtime."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.trie = VocabTrie(runtime.tokenizer.token_bytes)
        self.prompts = PromptBuilder(runtime.tokenizer, runtime.config, self.trie)
        self.contexts = ContextCache()
        # reuse what the last keystroke computed: the logits of an unchanged prompt, the KV and
        # logits of the branches it decoded (off only to measure what that saves)
        self.reuse_keystrokes = True
        self.suggestions = SuggestionCache()
        cfg = runtime.config
        self.stop_ids = set(cfg.eos_ids) | {i for i in (cfg.fim_prefix_id, cfg.fim_suffix_id, cfg.fim_middle_id,
                                                        cfg.fim_pad_id, cfg.file_sep_id, cfg.pad_id) if i >= 0}
        # tokens with no text that are not stops (padding placeholders, unused specials)
        token_bytes = runtime.tokenizer.token_bytes
        vocab = cfg.vocab_size
        self.banned_ids = np.array([i for i in range(vocab) if (i >= len(token_bytes) or not token_bytes[i])
                                    and i not in self.stop_ids], dtype=np.int64)

    @classmethod
    def load(cls, model: str | None = None, runtime: str = "onnx", device: str = "cpu",
             precision: str = "auto", threads: int | None = None) -> Engine:
        """Load a model (None: the shipped default) into a runtime and wrap it."""
        return cls(load_runtime(model, runtime=runtime, device=device, precision=precision, threads=threads))

    def forget(self) -> None:
        """Drop what earlier requests left behind (prompt KV states, shown candidates), so the
        next answer depends on its request alone: a reused KV prefix changes float rounding."""
        self.contexts.clear()
        self.suggestions.clear()
        self.prompts.forget()

    def describe(self) -> dict:
        return {**self.runtime.describe(), "params_m": round(self.runtime.config.n_params() / 1e6, 1)}

    # -- the pipeline -----------------------------------------------------------------
    def complete(self, request: CompletionRequest) -> Completion:
        t_start = time.perf_counter()
        decode_deadline = request.decode_deadline(time.monotonic())  # stamped once, here if not before
        if not 0 <= request.offset <= len(request.text):
            raise ValueError(f"cursor offset {request.offset} is outside the document (0..{len(request.text)})")
        request = windowed_request(request)
        if request is None:  # too big or binary: no completion (and no error)
            return Completion([], {"total": 0.0})
        opts = request.options
        key = request.path or "<untitled>"
        timer = _Timer({})
        lang = language_for(request.language, request.path)
        prefix, suffix = request.prefix, request.suffix

        cached = self.suggestions.lookup(key, prefix, suffix)
        if cached:
            timer.stage("cache", t_start)
            timer.timings["total"] = timer.timings["cache"]
            return Completion(cached[: opts.n], timer.timings, cached=True)

        t = time.perf_counter()
        scope = decide_scope(prefix, suffix, lang, opts.multiline)
        max_new = opts.max_new_tokens if scope.multiline else min(opts.max_new_tokens, SINGLE_LINE_MAX_NEW_TOKENS)
        prompt = self.prompts.build(request, max_new + back_off_tokens(opts))
        t = timer.stage("prompt", t)

        kept, reuse = self._prefill(prompt.tokens, self.contexts.take(key, prompt.tokens))
        t = timer.stage("prefill", t)

        alignment = Alignment(prompt.back_off.removed, self.trie)
        result = self._generate(kept, alignment, scope, request, max_new + prompt.back_off.removed_tokens,
                                decode_deadline, reuse)
        kept.trace = result.trace  # the next keystroke may continue along a branch
        self.contexts.put(key, kept)
        t = timer.stage("generate", t)
        timer.timings["alignment"] = result.constraint_ms

        candidates = self._to_candidates(result, alignment, scope)
        candidates = clean_candidates(candidates, prefix, suffix, scope)
        t = timer.stage("postprocess", t)
        if opts.rerank:
            candidates = rerank(candidates, prefix, suffix, lang)
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
    def _prefill(self, tokens: list[int], previous: KeptContext | None) -> Prefilled:
        """The prompt's KV and last logits, and what the decode may reuse of the last request."""
        if self.reuse_keystrokes and previous is not None:
            reused = reuse_last(self.runtime, tokens, previous)
            if reused is not None:
                return reused
        state, logits = self.runtime.prefill(tokens, previous.state if previous is not None else None)
        return Prefilled(KeptContext(state, logits), None)

    def _generate(self, kept: KeptContext, alignment: Alignment, scope: CompletionScope,
                  request: CompletionRequest, max_new: int, deadline: float, reuse: Reuse | None
                  ) -> GenerationResult:
        opts = request.options
        sampler = Sampler(temperature=opts.temperature, top_p=opts.top_p, seed=opts.seed,
                          banned=self.banned_ids if len(self.banned_ids) else None, alignment=alignment)
        loop = DecodeLoop(self.runtime, kept.state, kept.logits, n=max(1, opts.n), max_new_tokens=max_new,
                          alignment=alignment, sampler=sampler, stop_ids=self.stop_ids, stop_bytes=scope.stop_bytes,
                          deadline=deadline, cancelled=lambda: request.cancel.cancelled,
                          patience=opts.patience_steps, reuse=reuse)
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


__all__ = ["Engine"]
