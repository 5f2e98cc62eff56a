"""Token alignment (Athiwaratkun et al. 2024): when the cursor sits inside a token, back
off the last prompt tokens and let generation re-create their text, constrained by
character (byte) matching: a token is allowed iff it is a prefix of the remaining text
or the remaining text is a prefix of it.

The vocabulary index is a trie laid out as a sorted array of token byte strings: the
tokens below a trie node (all tokens starting with some bytes) are one contiguous range,
found by binary search, and the tokens that are prefixes of the remaining text are found
by walking the remaining text's prefixes. Both are O(len(remaining) · log V); masks are
cached by remaining text, so a typical step costs a dictionary lookup.
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# above this share of the vocabulary, allowed ids are found through a mask of the vocabulary
MASK_SHARE = 1 / 16


def _sorted_unique(ids: np.ndarray, vocab: int) -> np.ndarray:
    """The distinct ids, ascending. Not np.unique: numpy 2's hash-based unique took 8 ms for
    60k ids and 40-100 ms for 150k (a space, or a byte that the stand-in vocabulary's 150k
    placeholders begin with, agrees with that many), where a sort takes 0.9 and 2.2 ms and a
    mask of the vocabulary 0.4 ms. Measured on the 2-core development machine, numpy 2.4."""
    if len(ids) > MASK_SHARE * vocab:
        mask = np.zeros(max(vocab, int(ids.max()) + 1), dtype=bool)
        mask[ids] = True
        return np.flatnonzero(mask)
    ids = np.sort(ids)
    if len(ids) > 1:
        ids = ids[np.concatenate(([True], ids[1:] != ids[:-1]))]
    return ids


class VocabTrie:
    """Which tokens agree with a byte string, over a vocabulary of token byte strings."""

    def __init__(self, token_bytes: Sequence[bytes], mask_cache_size: int = 512):
        self.vocab_size = len(token_bytes)
        order = sorted((b, i) for i, b in enumerate(token_bytes) if b)
        self._sorted_bytes = [b for b, _ in order]
        self._sorted_ids = np.array([i for _, i in order], dtype=np.int64)
        self._by_bytes: dict[bytes, list[int]] = {}
        for b, i in order:
            self._by_bytes.setdefault(b, []).append(i)
        self._unique_bytes = sorted(self._by_bytes)  # a token's bytes may repeat in a vocabulary
        self._max_len = max((len(b) for b in self._sorted_bytes), default=0)
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._ids_cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._cache_size = mask_cache_size

    def _extensions(self, remaining: bytes) -> np.ndarray:
        """Ids of tokens that start with `remaining` (remaining is a prefix of them)."""
        lo = bisect.bisect_left(self._sorted_bytes, remaining)
        hi = bisect.bisect_left(self._sorted_bytes, remaining + b"\xff" * (self._max_len + 1))
        return self._sorted_ids[lo:hi]

    def _prefixes(self, remaining: bytes) -> list[int]:
        """Ids of tokens that are proper prefixes of `remaining`."""
        ids: list[int] = []
        for k in range(1, min(len(remaining), self._max_len + 1)):
            ids.extend(self._by_bytes.get(remaining[:k], ()))
        return ids

    def extends(self, text: bytes) -> bool:
        """Whether some token starts with `text` and is longer: a token could begin with it."""
        lo = bisect.bisect_left(self._unique_bytes, text)
        # the tokens starting with text are a range from lo; text itself, if a token, sorts first
        return any(b.startswith(text) and len(b) > len(text) for b in self._unique_bytes[lo : lo + 2])

    def allowed_ids(self, remaining: bytes) -> np.ndarray:
        """Sorted ids of every token that agrees with `remaining` (never an empty token)."""
        if not remaining:
            raise ValueError("no constraint: every token is allowed")
        ids = np.concatenate([self._extensions(remaining), np.array(self._prefixes(remaining), dtype=np.int64)])
        return _sorted_unique(ids, self.vocab_size)

    def allowed_ids_cached(self, remaining: bytes) -> np.ndarray:
        """allowed_ids, cached by remaining text (a branch re-creates the same text over a
        step's rows and the next keystroke's)."""
        ids = self._ids_cache.get(remaining)
        if ids is not None:
            self._ids_cache.move_to_end(remaining)
            return ids
        ids = self._ids_cache[remaining] = self.allowed_ids(remaining)
        if len(self._ids_cache) > self._cache_size:
            self._ids_cache.popitem(last=False)
        return ids

    def mask(self, remaining: bytes) -> np.ndarray:
        """Boolean (V,) mask of allowed tokens, cached by remaining text."""
        m = self._cache.get(remaining)
        if m is not None:
            self._cache.move_to_end(remaining)
            return m
        m = np.zeros(self.vocab_size, dtype=bool)
        m[self.allowed_ids(remaining)] = True
        self._cache[remaining] = m
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return m


def back_off_tokens(options) -> int:
    """How many prompt tokens a request may back off (0 without alignment): the context
    room kept for re-generating them, and the back-off's limit."""
    return options.back_off_tokens if options.align else 0


@dataclass
class BackOff:
    kept: list[int]  # prefix tokens the prompt keeps
    removed: bytes  # the text of the removed tokens, to be re-generated
    removed_tokens: int


def back_off(prefix_tokens: Sequence[int], token_bytes: Sequence[bytes], k: int,
             special_ids: set[int] | frozenset[int] = frozenset(), within_line: bool = True,
             trie: VocabTrie | None = None) -> BackOff:
    """Drop up to k tokens from the end of the prefix, stopping early at a special token
    (or a token with no text), and return the removed text.

    trie: drop only as many as needed. A token of the finished text that reaches past the
    cursor starts with the text from its start to the cursor, so only a position where
    that text begins some longer token can start one; the removed tokens must reach back
    to the earliest such position. Tokens before it are where the finished text's tokens
    are too: re-generating them costs a decode step each and changes nothing.

    within_line: after the first token, stop at the cursor line's start: a token that ends
    with a newline, or any token once the removed text holds one, lies on earlier lines,
    which the typing cannot re-tokenize. Re-generating them makes the model rewrite text
    it did not need to (a cursor on the indentation after a docstring would re-create
    the docstring's closing quotes)."""
    kept = list(prefix_tokens)
    removed: list[bytes] = []
    while kept and len(removed) < k:
        t = kept[-1]
        if t in special_ids or not token_bytes[t]:
            break
        if within_line and removed and (token_bytes[t].endswith(b"\n") or any(b"\n" in r for r in removed)):
            break
        removed.append(token_bytes[t])
        kept.pop()
    if trie is not None and removed:
        text = b"".join(reversed(removed))
        start = next((p for p in range(len(text)) if trie.extends(text[p:])), len(text))
        while removed and len(removed[-1]) <= start:  # the earliest removed token ends before it
            start -= len(removed.pop())
            kept.append(prefix_tokens[len(kept)])
    return BackOff(kept, b"".join(reversed(removed)), len(removed))


def back_off_prompt(prefix_tokens: Sequence[int], options, config, token_bytes: Sequence[bytes],
                    special_ids: frozenset[int], trie: VocabTrie) -> BackOff:
    """The back-off a request's options and the model's config ask for: up to
    back_off_tokens(options) tokens, only as many as needed when back_off_needed says so
    (None: the model's align_back_off setting)."""
    needed = options.back_off_needed if options.back_off_needed is not None else config.align_back_off == "needed"
    return back_off(prefix_tokens, token_bytes, back_off_tokens(options), special_ids, trie=trie if needed else None)


class Alignment:
    """One request's token alignment in the decode: the backed-off text that each branch's
    first tokens must re-create (its `remaining` bytes), the mask that keeps them to it,
    and the visible text once it is re-created."""

    def __init__(self, removed: bytes, trie: VocabTrie | None):
        self.removed = removed
        # without a trie nothing is masked (a caller that backs off nothing passes none)
        self.trie = trie if removed else None
        self.mask_ms = 0.0  # time spent building masks

    def constrain(self, logits: np.ndarray, remaining: bytes) -> np.ndarray:
        """logits with every token that disagrees with `remaining` at -inf (a copy)."""
        t0 = time.perf_counter()
        mask = self.trie.mask(remaining)
        self.mask_ms += (time.perf_counter() - t0) * 1000
        return np.where(mask[: logits.shape[-1]], logits, -np.inf)

    def allowed(self, remaining: bytes, vocab: int) -> np.ndarray:
        """The ascending ids below `vocab` that agree with `remaining`: the entries of a row
        that constrain leaves finite, without a pass over the row."""
        t0 = time.perf_counter()
        ids = self.trie.allowed_ids_cached(remaining)
        if len(ids) and ids[-1] >= vocab:
            ids = ids[: int(np.searchsorted(ids, vocab))]
        self.mask_ms += (time.perf_counter() - t0) * 1000
        return ids

    def visible(self, generated: bytes) -> bytes | None:
        """The generated bytes without the re-created text; None when the branch stopped
        before re-creating it (nothing to show)."""
        if len(generated) < len(self.removed):
            return None
        return strip_constraint(generated, self.removed)


def advance(remaining: bytes, token: bytes) -> bytes:
    """The constraint left after generating `token` (empty once it is satisfied)."""
    if len(token) >= len(remaining):
        return b""
    return remaining[len(token):]


def strip_constraint(generated: bytes, removed: bytes) -> bytes:
    """What the user sees: generated bytes minus the re-generated removed text."""
    if not generated.startswith(removed[: len(generated)]):
        raise ValueError("generated text does not agree with the backed-off text")
    return generated[len(removed):]
