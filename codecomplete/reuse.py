"""What one keystroke keeps for the next: the prompt's KV state with its last logits and
the trace of the decode steps run over it. The next keystroke needs no model call for a
prompt that is unchanged, no prefill for a prompt that goes on along a decoded branch
(the runtime adopts that branch's KV), and no decode call while its branches walk paths
decoded here (the step loop is served from the trace)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from codecomplete.runtime.base import BranchState, ContextState, Runtime, TopRows


@dataclass
class TraceStep:
    """One decode step of a request: the token paths its rows had been fed, where their KV
    sits and the logits that followed them."""

    rows: dict[tuple[int, ...], int]  # token path (from the context on) -> index into logits/state_rows
    state: BranchState  # the branch cache holding those paths' KV
    state_rows: list[int]  # the row of `state` for each index
    logits: np.ndarray  # (paths, V): the logits after each path
    offset: int = 0  # the step of `state` where a path's first token sits


class TracedPath(NamedTuple):
    """Where a decoded token path's KV sits and what followed it (DecodeTrace.find)."""

    branches: BranchState  # the branch cache holding the path's KV
    row: int  # its row in that cache
    logits: np.ndarray  # (V,) the logits after the path
    offset: int  # the step of `branches` where the path's first token sits


@dataclass
class DecodeTrace:
    """What the decode steps of one request computed, kept for the next keystroke. When
    its prompt is this one's followed by tokens a branch was fed, the runtime copies their
    KV from the branch cache (no prefill); and while its new branches walk paths decoded
    here, their logits come from here (no decode call). steps[k - 1]: paths of k tokens."""

    steps: list[TraceStep] = field(default_factory=list)

    def find(self, tokens: Sequence[int]) -> TracedPath | None:
        """The branch cache, row, following logits and offset of a decoded path, or None."""
        if not 0 < len(tokens) <= len(self.steps):
            return None
        step = self.steps[len(tokens) - 1]
        i = step.rows.get(tuple(tokens))
        return None if i is None else TracedPath(step.state, step.state_rows[i], step.logits[i], step.offset)

    def serve(self, paths: list[tuple[int, ...]], ext: tuple[int, ...]) -> TraceStep | None:
        """A step for rows fed `paths` over a context that is this trace's plus `ext`, when
        every one of them was decoded here (rows in the order of paths), else None."""
        depth = len(ext) + len(paths[0])
        if depth > len(self.steps):
            return None
        step = self.steps[depth - 1]
        found = [step.rows.get(ext + p) for p in paths]
        if any(i is None for i in found):
            return None
        return TraceStep({p: r for r, p in enumerate(paths)}, step.state, [step.state_rows[i] for i in found],
                         step.logits[found], step.offset + len(ext))


class Reuse(NamedTuple):
    """What the step loop may take from the last keystroke: its trace, and the tokens this
    request's context has beyond that keystroke's (() for the same prompt)."""

    trace: DecodeTrace
    ext: tuple[int, ...]


@dataclass
class KeptContext:
    """A prompt's KV state as the engine keeps it between keystrokes: with the logits after
    its last token and, once decoded over, the trace of those decode steps."""

    state: ContextState
    logits: np.ndarray | TopRows  # (V,) after the prompt's last token; with batching on a runtime that
    # reduces rows, a typed token's row as the device reduced it (one row, TopRows.banned recorded)
    trace: DecodeTrace | None = None

    @property
    def tokens(self) -> list[int]:
        return self.state.tokens


class Prefilled(NamedTuple):
    """The prompt ready to decode: its KV state, the logits after it, what may be reused."""

    kept: KeptContext
    reuse: Reuse | None


def reuse_last(runtime: Runtime, tokens: list[int], previous: KeptContext) -> Prefilled | None:
    """The prompt `tokens` without a prefill, from what the last keystroke kept: the same
    prompt (typing inside a word that the back-off removes, a request repeated: its logits
    are kept), or the last prompt followed by tokens a candidate branch was fed (the user
    typed what a candidate began with: the runtime adopts their KV, the logits after them
    come from the trace). None: a prefill is needed."""
    trace = previous.trace
    if previous.tokens == tokens:
        state = previous.state
        state.reused_tokens, state.new_tokens, state.adopted_tokens = len(tokens), 0, 0
        return Prefilled(previous, Reuse(trace, ()) if trace is not None else None)
    m = len(previous.tokens)
    if trace is None or len(tokens) <= m or tokens[:m] != previous.tokens:
        return None
    ext = tuple(tokens[m:])
    found = trace.find(ext)
    if found is None:
        return None
    state = runtime.adopt(previous.state, found.branches, found.row, ext, start=found.offset)
    if state is None:
        return None
    return Prefilled(KeptContext(state, found.logits), Reuse(trace, ext))
