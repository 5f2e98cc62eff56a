"""Choosing each branch's next token from its row's logits: greedy for candidate 0,
nucleus sampling (seeded per candidate) for the rest, banned ids and the alignment mask
applied first. Branches that share a row share the work of one step."""

from __future__ import annotations

import numpy as np

from codecomplete.alignment import Alignment

TOP_K = 64  # sampling looks at the 64 best tokens only: cheap on 150k vocabularies
TAIL = 20.0  # tokens this far below the best (after temperature) hold < 3e-9 of its probability


def _logsumexp(x: np.ndarray) -> float:
    """log Σ exp(x) over the entries within TAIL of the largest: the others hold less than
    V·e^-TAIL of the mass (3e-4 of it for a 152k-token vocabulary), a negligible error in
    a log-probability, and a 150k-wide row then costs one comparison instead of an exp
    (1.2 against 0.2 ms a row on a busy 2-core machine)."""
    m = float(x.max())
    near = x[x >= m - TAIL]
    return m + float(np.log(np.exp(near - m).sum()))


def _nucleus(logits: np.ndarray, temperature: float, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The tokens nucleus sampling draws from, best first, and their cumulative weights:
    the TOP_K best tokens, cut where they reach top_p of their mass. Only the tokens near
    the best are ranked (a comparison over the vocabulary instead of a partition of it)."""
    t = max(temperature, 1e-4)
    near = np.flatnonzero(logits >= logits.max() - TAIL * t)
    if len(near) > TOP_K:
        near = near[np.argpartition(logits[near], len(near) - TOP_K)[len(near) - TOP_K:]]
    top = near[np.argsort(-logits[near])]
    z = logits[top] / t
    c = np.cumsum(np.exp(z - z[0]))  # z[0] is the largest
    keep = min(int(np.searchsorted(c, top_p * c[-1]) + 1), len(top))  # the nucleus: top_p of the mass
    return top[:keep], c[:keep]


def _draw(nucleus: tuple[np.ndarray, np.ndarray], rng: np.random.Generator) -> int:
    """Inverse CDF over the nucleus (what rng.choice does, without its checks and copies)."""
    top, c = nucleus
    i = int(np.searchsorted(c, rng.random() * c[-1], side="right"))
    return int(top[min(i, len(top) - 1)])


def _sample(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_p: float) -> int:
    return _draw(_nucleus(logits, temperature, top_p), rng)


class Sampler:
    """One request's token choice. Call `start_step` with each step's logits (rows, V),
    then `pick` once per active branch."""

    def __init__(self, *, temperature: float, top_p: float, seed: int, banned: np.ndarray | None,
                 alignment: Alignment):
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.banned = banned
        self.alignment = alignment
        self._rngs: dict[int, np.random.Generator] = {}  # made when a branch first samples (greedy never does)
        self._logits: np.ndarray | None = None
        # per step, per row: branches sharing a row share this work
        self._row_logits: dict[int, np.ndarray] = {}
        self._row_lse: dict[int, float] = {}
        self._row_nucleus: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def start_step(self, logits: np.ndarray) -> None:
        self._logits = logits
        self._row_logits.clear()
        self._row_lse.clear()
        self._row_nucleus.clear()

    def _rng(self, branch: int) -> np.random.Generator:
        rng = self._rngs.get(branch)
        if rng is None:
            rng = self._rngs[branch] = np.random.default_rng(self.seed * 1000 + branch)
        return rng

    def pick(self, branch: int, row: int, remaining: bytes) -> tuple[int, float]:
        """(token, its log-probability) for a branch fed `row` that must still re-create
        `remaining` of the backed-off text."""
        lg = self._row_logits.get(row)
        if lg is None:
            lg = np.array(self._logits[row], dtype=np.float32)
            if self.banned is not None:
                lg[self.banned] = -np.inf
            self._row_logits[row] = lg
        constrained = bool(remaining) and self.alignment.trie is not None
        if constrained:
            lg = self.alignment.constrain(lg, remaining)
            lse = _logsumexp(lg)
        else:
            lse = self._row_lse.get(row)
            if lse is None:
                lse = self._row_lse[row] = _logsumexp(lg)
        if branch == 0:
            tok = int(np.argmax(lg))
        elif constrained:
            tok = _sample(lg, self._rng(branch), self.temperature, self.top_p)
        else:  # branches sharing a row draw from one nucleus
            nucleus = self._row_nucleus.get(row)
            if nucleus is None:
                nucleus = self._row_nucleus[row] = _nucleus(lg, self.temperature, self.top_p)
            tok = _draw(nucleus, self._rng(branch))
        return tok, float(lg[tok]) - lse
