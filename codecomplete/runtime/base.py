"""The runtime seam: everything model-specific hides behind this small interface.

The engine sees token ids in and float32 numpy logits out; it never imports torch or
onnxruntime. A runtime keeps the prompt's KV cache once (no batch dimension) in a
ContextState and each candidate's small decode cache in a BranchState.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from codecomplete.models.format.config import ModelConfig

if TYPE_CHECKING:  # the annotation only: importing the runtime names costs no tokenizers import
    from codecomplete.models.format.tokenizer import Tokenizer


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share. Slices compared as lists (C loops), halved
    towards the first difference: 5-8 µs for two 1.5k-token prompts a keystroke apart, where
    a Python loop over the tokens took 31-37 µs (2-core EPYC). The scheduler thread asks it
    of every riding prompt, the typing cache of every kept state."""
    if not isinstance(a, list):
        a = list(a)
    if not isinstance(b, list):
        b = list(b)
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], and they differ before hi
    while hi - lo > 32:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    while a[lo] == b[lo]:  # the difference is before hi
        lo += 1
    return lo


@dataclass
class ContextState:
    """The prompt's tokens and its KV cache (runtime-specific storage in `kv`)."""

    tokens: list[int]
    kv: object = None
    reused_tokens: int = 0  # how many leading tokens came from the previous state
    new_tokens: int = 0  # how many were computed by this prefill
    adopted_tokens: int = 0  # how many came from a branch cache (Runtime.adopt), not computed

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class BranchState:
    """N candidates' decode caches over a shared context."""

    n: int
    max_new_tokens: int
    step: int = 0  # tokens already decoded into the branch caches
    kv: object = None
    extra: dict = field(default_factory=dict)


@dataclass
class DecodeStep:
    context: ContextState
    branches: BranchState
    next_tokens: Sequence[int]
    # row -> the ids whose logits the caller reads from that row of this step (a pick that
    # token alignment constrains): a runtime that reduces rows on its device fetches them
    # with the reduction (TopRows.gather answers from them, no round trip of its own);
    # others may ignore it
    gather: dict[int, np.ndarray] | None = None


@dataclass
class PrefillChunk:
    """A prefill, `prefill(tokens, previous, capacity_tokens=)`, handed to a decode step: a
    runtime whose fused_chunk_tokens is above 0 takes `chunk=` in decode_many and
    decode_many_top, and the chunk's new tokens (at most that many) ride the step's pass
    over the weights; a longer one, or one the step cannot carry, runs as a plain prefill
    first. The call sets `state` and `logits` as prefill returns them, and `fused`."""

    tokens: list[int]
    previous: ContextState | None = None
    capacity_tokens: int | None = None
    state: ContextState | None = None
    logits: np.ndarray | None = None
    fused: bool = False  # whether it rode the step


UNKNOWN_BANNED = object()  # TopRows.banned where no one recorded what the rows were reduced under


class TopRows:
    """Rows of a step's logits reduced where they were computed (on the device): per row its
    k best allowed tokens (`ids` ascending, `values` their float32 logits) and `lse`, the
    log-sum-exp over its allowed tokens within `tail` of the best (what the sampler's own
    log-sum-exp reads). The whole row stays where it was: `rows[i]` (an int) fetches row i
    as a (V,) float32 array; a slice or a list of ints gives those rows as TopRows;
    gather(i, ids) fetches row i's logits at those ids only (what a pick constrained to a
    few hundred ids by token alignment reads); `gathered` holds those fetched with the
    step (DecodeStep.gather), by the step's row: {row: (ids, their float32 logits)}."""

    def __init__(self, ids: np.ndarray, values: np.ndarray, lse: np.ndarray, fetch, index: np.ndarray | None = None,
                 gather=None, vocab: int | None = None, banned=UNKNOWN_BANNED,
                 gathered: dict[int, tuple[np.ndarray, np.ndarray]] | None = None):
        self.ids, self.values, self.lse = ids, values, lse
        # the banned-ids array the rows were reduced under, where the caller records it (a
        # sampler banning another array reads the whole rows instead)
        self.banned = banned
        self._fetch = fetch  # indices into the step's rows -> (len, V) float32 host array
        self._gather = gather  # (index into the step's rows, ids) -> float32 logits of those ids (None: via fetch)
        self._index = np.arange(len(ids)) if index is None else index
        self.vocab = vocab  # V (None: not told)
        self._gathered = gathered or {}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self._fetch(self._index[[int(key)]])[0]
        return TopRows(self.ids[key], self.values[key], self.lse[key], self._fetch, self._index[key], self._gather,
                       self.vocab, self.banned, self._gathered)

    def gather(self, row: int, ids: np.ndarray) -> np.ndarray:
        """Row `row`'s float32 logits at `ids`, the same numbers as self[row][ids]."""
        at = int(self._index[int(row)])
        known = self._gathered.get(at)
        if known is not None and (known[0] is ids or np.array_equal(known[0], ids)):
            return known[1]
        if self._gather is None:
            return self[row][ids]
        return self._gather(at, ids)

    def full(self) -> np.ndarray:
        """All rows (rows, V) float32, fetched in one copy."""
        return self._fetch(self._index)


class Runtime(abc.ABC):
    """prefill / decode over one model; one instance serves one request at a time."""

    name: str = "runtime"
    config: ModelConfig
    tokenizer: Tokenizer
    batch_attention: str = "bifurcated"   # or "plain": how decode_many attends a request's context

    @abc.abstractmethod
    def prefill(self, tokens: Sequence[int], previous: ContextState | None = None, *,
                capacity_tokens: int | None = None) -> tuple[ContextState, np.ndarray]:
        """Compute the context KV for `tokens`, reusing the longest common prefix with
        `previous` (which the call may consume). Returns the state and the last
        token's logits (V,) float32. capacity_tokens: the length the context will grow to
        (a chunked prefill's final prompt), so the first chunk's cache holds them all;
        a hint, which a runtime may ignore."""

    @abc.abstractmethod
    def start_branches(self, context: ContextState, n: int, max_new_tokens: int) -> BranchState:
        """Empty decode caches for n branches of up to max_new_tokens tokens each."""

    @abc.abstractmethod
    def decode(self, context: ContextState, branches: BranchState, next_tokens: Sequence[int]
               ) -> np.ndarray:
        """Feed one token to each branch; logits (N, V) float32 for the next position."""

    def decode_many(self, steps: Sequence[DecodeStep]) -> list[np.ndarray]:
        """One decode step for several independent requests: the same as calling
        self.decode(s.context, s.branches, s.next_tokens) for each in order (each branches.step
        advances by one), but a batching runtime runs them as one forward pass. Returns each
        request's (N_i, V) float32 logits, in order."""
        return [self.decode(s.context, s.branches, s.next_tokens) for s in steps]

    reduces_rows = False  # decode_many_top reduces rows where they are computed
    fused_chunk_tokens = 0  # > 0: decode_many(_top) take chunk=PrefillChunk of up to this many new tokens

    def decode_many_top(self, steps: Sequence[DecodeStep], full: Sequence[bool], banned: np.ndarray | None,
                        k: int, tail: float) -> list[np.ndarray | TopRows]:
        """decode_many, whose steps with full[i] False may come back as TopRows: their rows'
        k best tokens outside `banned` and their log-sum-exp over the tokens within `tail`
        of the best, so that a (rows, vocabulary) array need not reach the host; each
        TopRows records `banned` (TopRows.banned, the very array). This default returns
        every step's whole rows."""
        return self.decode_many(steps)

    @abc.abstractmethod
    def select_branches(self, branches: BranchState, keep: Sequence[int]) -> BranchState:
        """Keep only the listed branches (in that order), e.g. after some have stopped."""

    reuses_branches = False  # adopt, branch_from and context_prefix are implemented

    def context_prefix(self, context: ContextState, n: int) -> ContextState | None:
        """The first `n` tokens of `context`, over its KV storage (no copy): a prompt that
        rewrites the last tokens of the previous one (a backspace, a back-off that moved)
        decodes its new tokens over this and adopts them. Consumes `context`. None where the
        runtime cannot."""
        return None

    def adopt(self, context: ContextState, branches: BranchState, row: int, tokens: Sequence[int],
              start: int = 0) -> ContextState | None:
        """The context followed by `tokens`, which one row of `branches` was fed from its step
        `start` on (decoded over this context), their KV copied from the branch cache: a
        prompt that continues along a decoded branch needs no prefill. Consumes `context`.
        None where the runtime cannot (the caller then prefills)."""
        return None

    def branch_from(self, context: ContextState, branches: BranchState, rows: Sequence[int], start: int,
                    steps: int, max_new_tokens: int) -> BranchState | None:
        """New branches over `context` whose first `steps` tokens are those that `rows` of
        `branches` were fed from step `start` on, their KV copied (the steps a keystroke takes
        from the last one's trace); `context` is the one `branches` decoded over, followed by
        their first `start` tokens. None where the runtime cannot."""
        return None

    def check_prefill(self, tokens: Sequence[int]) -> list[int]:
        """The prompt as a list of ints; a clear error for one that is empty or too long."""
        # (C loops: a 1.5k-token prompt's comprehension took 60 µs of the scheduler thread)
        if isinstance(tokens, np.ndarray):
            if tokens.ndim != 1:
                raise ValueError(f"prefill takes a sequence of token ids, not an array of shape {tokens.shape}")
            tokens = tokens.astype(np.int64, copy=False).tolist()
        else:
            tokens = list(map(int, tokens))
        if not tokens:
            raise ValueError("prefill needs at least one token")
        if len(tokens) > self.config.max_seq_len:
            raise ValueError(f"prompt of {len(tokens)} tokens exceeds the model context {self.config.max_seq_len}")
        return tokens

    def check_decode(self, context: ContextState, branches: BranchState, next_tokens: Sequence[int]) -> None:
        """A clear error for a decode step that does not fit the branches or the context."""
        if len(next_tokens) != branches.n:
            raise ValueError(f"{len(next_tokens)} tokens for {branches.n} branches")
        if branches.step >= branches.max_new_tokens:
            raise ValueError("branch caches are full")
        if len(context.tokens) + branches.step + 1 > self.config.max_seq_len:
            raise ValueError("decoding past the model context")

    def max_context(self) -> int:
        return self.config.max_seq_len

    def describe(self) -> dict:
        """Short facts for logs: runtime name, device, precision, provider."""
        return {"runtime": self.name}

    def reuse_split(self, tokens: Sequence[int], previous: ContextState | None) -> int:
        """How many leading tokens of `tokens` can keep their KV from `previous`
        (always leaving at least one token to compute, for the last logits)."""
        if previous is None or not previous.tokens:
            return 0
        return min(common_prefix_len(previous.tokens, tokens), len(tokens) - 1)
