"""The completion pipeline, one small function per stage:

    prompt -> alignment (back-off) -> prefill (KV reuse) -> generate (N branches)
    -> postprocess -> rerank

The engine knows nothing about LSP and never imports torch or onnxruntime itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from codecomplete.alignment import VocabTrie, strip_constraint
from codecomplete.cache import ContextCache, SuggestionCache
from codecomplete.languages import language_for
from codecomplete.postprocess import clean_candidates
from codecomplete.prompt import PromptBuilder
from codecomplete.request import Candidate, Completion, CompletionRequest
from codecomplete.rerank import rerank
from codecomplete.runtime import Runtime, load_runtime
from codecomplete.runtime.base import ContextState
from codecomplete.sampling import DecodeTrace, GenerationResult, generate
from codecomplete.scope import CompletionScope, decide_scope

MAX_DOCUMENT_CHARS = 8_000_000  # bigger documents get no completion (and no error)


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
        if not 0 <= request.offset <= len(request.text):
            raise ValueError(f"cursor offset {request.offset} is outside the document (0..{len(request.text)})")
        if len(request.text) > MAX_DOCUMENT_CHARS:
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
        max_new = self._max_new_tokens(opts.max_new_tokens, scope.multiline)
        prompt = self.prompts.build(request, max_new + prompt_back_off_room(opts))
        t = timer.stage("prompt", t)

        state, logits, reuse = self._prefill(prompt.tokens, self.contexts.take(key, prompt.tokens))
        t = timer.stage("prefill", t)

        deadline = time.monotonic() + opts.deadline_ms / 1000.0 - (t - t_start)
        result = self._generate(state, logits, prompt.back_off.removed, scope, request,
                                max_new + prompt.back_off.removed_tokens, deadline, reuse)
        state.trace = result.trace  # the next keystroke may continue along a branch
        self.contexts.put(key, state)
        t = timer.stage("generate", t)
        timer.timings["alignment"] = result.constraint_ms

        candidates = self._to_candidates(result, prompt.back_off.removed, scope)
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
        cancelled = request.cancel is not None and request.cancel.cancelled
        if not cancelled:
            self.suggestions.put(key, prefix, suffix, candidates)
        return Completion(candidates, timer.timings, tokens_generated=result.tokens_generated,
                          model_calls=int(state.new_tokens > 0) + result.steps, prefill_reused_tokens=state.reused_tokens,
                          prefill_new_tokens=state.new_tokens, prefill_adopted_tokens=state.adopted_tokens,
                          cancelled=cancelled,
                          decode_rows=result.rows_decoded, branch_rows=result.branch_rows)

    # -- stages ---------------------------------------------------------------------------
    def _prefill(self, tokens: list[int], previous: ContextState | None
                 ) -> tuple[ContextState, np.ndarray, tuple[DecodeTrace, tuple[int, ...]] | None]:
        """The prompt's KV and last logits, and what the decode may reuse of the last request
        (its trace and the tokens this prompt has beyond that request's)."""
        if self.reuse_keystrokes and previous is not None:
            reused = self._reuse_last(tokens, previous)
            if reused is not None:
                return reused
        state, logits = self.runtime.prefill(tokens, previous)
        state.logits = logits
        return state, logits, None

    def _reuse_last(self, tokens: list[int], previous: ContextState):
        """No model call when the prompt is unchanged (typing inside a word that the back-off
        removes, a request repeated: the logits are kept) or when it continues the last
        prompt with tokens a candidate branch was fed (the user typed what a candidate began
        with): their KV and the logits after them come from that request's decode steps.
        None: a prefill is needed."""
        trace = previous.trace if isinstance(previous.trace, DecodeTrace) else None
        if previous.logits is not None and previous.tokens == tokens:
            previous.reused_tokens, previous.new_tokens, previous.adopted_tokens = len(tokens), 0, 0
            return previous, previous.logits, (trace, ()) if trace is not None else None
        m = len(previous.tokens)
        if trace is None or len(tokens) <= m or tokens[:m] != previous.tokens:
            return None
        ext = tuple(tokens[m:])
        found = trace.find(ext)
        if found is None:
            return None
        branches, row, logits, start = found
        state = self.runtime.adopt(previous, branches, row, ext, start=start)
        if state is None:
            return None
        state.logits = logits
        return state, logits, (trace, ext)

    @staticmethod
    def _max_new_tokens(requested: int, multiline: bool) -> int:
        """Single-line completions rarely need more than 48 tokens; blocks may use all."""
        return requested if multiline else min(requested, 48)

    def _generate(self, state, logits, constraint: bytes, scope: CompletionScope, request: CompletionRequest,
                  max_new: int, deadline: float, reuse=None) -> GenerationResult:
        opts = request.options

        def stop_fn(visible: bytes) -> int | None:
            text = visible.decode("utf-8", errors="ignore")
            cut = scope.stop_index(text)
            return None if cut is None else len(text[:cut].encode("utf-8"))

        cancelled = (lambda: request.cancel.cancelled) if request.cancel is not None else (lambda: False)
        return generate(self.runtime, state, logits, n=max(1, opts.n),
                        max_new_tokens=max_new,
                        constraint=constraint, trie=self.trie if constraint else None,
                        stop_ids=self.stop_ids, stop_fn=stop_fn, temperature=opts.temperature,
                        top_p=opts.top_p, seed=opts.seed, deadline=deadline, cancelled=cancelled,
                        banned=self.banned_ids if len(self.banned_ids) else None, patience=opts.patience_steps,
                        reuse=reuse)

    @staticmethod
    def _to_candidates(result: GenerationResult, constraint: bytes, scope: CompletionScope) -> list[Candidate]:
        out = []
        for b in result.branches:
            data = bytes(b.data)
            if len(data) < len(constraint):
                continue  # stopped before re-creating the typed text: nothing to show
            visible = strip_constraint(data, constraint)
            if b.cut_bytes >= 0:
                visible = visible[: b.cut_bytes]
            text = visible.decode("utf-8", errors="ignore")
            if b.stop_reason == "patience" and not scope.multiline:
                continue  # an unfinished line
            if b.stop_reason in ("deadline", "patience") and scope.multiline and "\n" in text:
                text = text[: text.rfind("\n")]  # a late block is cut at its last full line
            out.append(Candidate(text=text, logprob=b.logprob_sum / max(1, b.scored_tokens),
                                 tokens=len(b.tokens), stop_reason=b.stop_reason))
        return out


def prompt_back_off_room(opts) -> int:
    """Context room kept for re-generating backed-off tokens."""
    return opts.back_off_tokens if opts.align else 0


__all__ = ["Engine"]
