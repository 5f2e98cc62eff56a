"""Caches that make keystrokes cheap: the prompt KV states of recent requests (reused by
longest common token prefix) and the typing-as-suggested cache (if the user types the
start of a shown candidate, the rest comes back without running the model)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from codecomplete.request import Candidate, StopReason
from codecomplete.reuse import KeptContext
from codecomplete.runtime.base import common_prefix_len


class ContextCache:
    """A few recent prompts' kept KV states; hands out the one sharing the most prompt tokens.

    others_when_full: another document's state is handed out only while the cache is full
    (a server keeping many typists' documents must not give one typist's state to another's
    first request while it has room for both); False: whenever it shares the most tokens
    (a laptop's two entries double as recycled buffers)."""

    def __init__(self, size: int = 2, others_when_full: bool = False):
        self.size = size
        self.others_when_full = others_when_full
        self._lock = threading.Lock()
        self._states: OrderedDict[str, KeptContext] = OrderedDict()

    def take(self, key: str, tokens: list[int]) -> KeptContext | None:
        """Remove and return the best state for these tokens (the runtime may consume it)."""
        with self._lock:
            states = self._states
            if self.others_when_full and len(states) < self.size:
                return states.pop(key, None)
            if not states:
                return None
            best_key = max(states, key=lambda k: common_prefix_len(states[k].tokens, tokens))
            if common_prefix_len(states[best_key].tokens, tokens) == 0:
                best_key = key if key in states else next(iter(states))  # recycle buffers
            return states.pop(best_key)

    def put(self, key: str, kept: KeptContext) -> None:
        with self._lock:
            self._states[key] = kept
            self._states.move_to_end(key)
            while len(self._states) > self.size:
                self._states.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._states.clear()


@dataclass
class _Shown:
    prefix: str
    suffix: str
    candidates: list[Candidate]


class SuggestionCache:
    """Remembers the candidates last shown per document."""

    def __init__(self, size: int = 32, max_typed_chars: int = 256):
        self.size = size
        self.max_typed_chars = max_typed_chars
        self._lock = threading.Lock()
        self._shown: OrderedDict[str, _Shown] = OrderedDict()

    def put(self, key: str, prefix: str, suffix: str, candidates: list[Candidate]) -> None:
        if not candidates:
            return
        with self._lock:
            self._shown[key] = _Shown(prefix, suffix, candidates)  # references, not copies
            self._shown.move_to_end(key)
            while len(self._shown) > self.size:
                self._shown.popitem(last=False)

    def lookup(self, key: str, prefix: str, suffix: str) -> list[Candidate] | None:
        """Candidates whose start the user has typed since they were shown, minus that start."""
        with self._lock:
            shown = self._shown.get(key)
        if shown is None or suffix != shown.suffix:
            return None
        typed_len = len(prefix) - len(shown.prefix)
        if not 0 < typed_len <= self.max_typed_chars or not prefix.startswith(shown.prefix):
            return None
        typed = prefix[len(shown.prefix):]
        out = []
        for c in shown.candidates:
            if c.text.startswith(typed) and len(c.text) > len(typed):
                out.append(Candidate(text=c.text[len(typed):], score=c.score, logprob=c.logprob,
                                     syntax_ok=c.syntax_ok, score_parts=dict(c.score_parts), tokens=0,
                                     stop_reason=StopReason.CACHED))
        return out or None

    def clear(self) -> None:
        with self._lock:
            self._shown.clear()
