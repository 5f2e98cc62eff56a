"""Choosing each branch's next token from its row's logits: greedy for candidate 0,
nucleus sampling (seeded per candidate) for the rest, banned ids and the alignment mask
applied first. Branches that share a row share the work of one step."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from codecomplete.alignment import Alignment
from codecomplete.runtime.base import TopRows

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
    m = logits.max()
    near = np.flatnonzero(logits >= m - TAIL * t)
    return _nucleus_of(near, logits[near], m, t, top_p)


def _nucleus_of(near: np.ndarray, values: np.ndarray, m: float, t: float, top_p: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """_nucleus over a row's candidates: `near` the ids (ascending) of at least every token
    within TAIL·t of the row's best `m`, `values` their logits."""
    if len(near) and values.min() < m - TAIL * t:
        inside = values >= m - TAIL * t
        near, values = near[inside], values[inside]
    if len(near) > TOP_K:
        part = np.argpartition(values, len(near) - TOP_K)[len(near) - TOP_K:]
        near, values = near[part], values[part]
    order = np.argsort(-values, kind="stable")  # ties by position (ascending id), as pick_many sorts them
    top = near[order]
    z = values[order] / t
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


def _sparse_nonzero(mask: np.ndarray) -> np.ndarray:
    """np.flatnonzero of a mask that is nearly all False, in half its time: the 8-byte words
    holding a True first, then the bytes of those words."""
    flat = mask.reshape(-1)
    n = len(flat) // 8 * 8
    words = np.flatnonzero(flat[:n].view(np.uint64) != 0)
    bytes_at = (words[:, None] * 8 + np.arange(8)).reshape(-1)
    return np.concatenate([bytes_at[flat[bytes_at]], np.flatnonzero(flat[n:]) + n])


CONSTRAINED_IDS_KEPT = 16  # a request's texts to re-create: the backed-off text and what is left of it
SPARSE_SHARE = 1 / 32  # rows with fewer of their tokens within reach are reduced all at once


class _Rows:
    """One step's rows reduced to what an unconstrained pick needs: per row the ids
    (ascending) and logits of every allowed token within reach of its best allowed one. A
    row whose best token is banned is left out (`has` False): its pick bans on a copy of
    the row. Two ways to the same answer: rows with few tokens within reach (a large model's
    peaked rows) all at once through the words of the mask; rows holding much of the
    vocabulary within reach (a small model's flat ones) row by row, a gather each."""

    def __init__(self, logits: np.ndarray, banned_mask: np.ndarray | None, reach: float):
        m = logits.max(axis=1)
        near = logits >= (m - reach)[:, None]
        n_rows, vocab = logits.shape
        self.has = np.zeros(n_rows, dtype=bool)
        if np.count_nonzero(near) < SPARSE_SHARE * near.size:
            rows, ids = np.divmod(_sparse_nonzero(near), vocab)
            values = logits[rows, ids]
            if banned_mask is not None:
                allowed = ~banned_mask[ids]
                rows, ids, values = rows[allowed], ids[allowed], values[allowed]
            bounds = np.searchsorted(rows, np.arange(n_rows + 1)).tolist()
            self.ids = [ids[bounds[r]:bounds[r + 1]] for r in range(n_rows)]
            self.values = [values[bounds[r]:bounds[r + 1]] for r in range(n_rows)]
        else:
            self.ids, self.values = [], []
            for r in range(n_rows):
                ids = np.flatnonzero(near[r])
                if banned_mask is not None:
                    ids = ids[~banned_mask[ids]]
                self.ids.append(ids)
                self.values.append(logits[r, ids])
        for r, values in enumerate(self.values):
            # a banned best: the allowed tokens within reach of the best allowed one may lie
            # below `m - reach`, outside what was kept
            self.has[r] = len(values) > 0 and values.max() == m[r]
        self.best = m
        self.lse = None  # computed by pick, over these values

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray, np.float32]:
        """(ids, logits, the row's best) of row r; the best as float32, so thresholds round
        as they do over the whole row."""
        return self.ids[r], self.values[r], self.best[r]


class _TopReduced:
    """_Rows of a step the runtime reduced itself (TopRows: its rows' TOP_K best allowed
    tokens and their log-sum-exp)."""

    def __init__(self, top: TopRows):
        self.ids, self.values, self.lse = top.ids, top.values, top.lse
        self.best = top.values.max(axis=1)
        self.has = np.ones(len(top.ids), dtype=bool)

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray, np.float32]:
        return self.ids[r], self.values[r], self.best[r]


class Sampler:
    """One request's token choice. Call `start_step` with each step's logits (rows, V) or
    TopRows (the runtime's reduction of them, its banned ids this sampler's), then `pick`
    once per active branch."""

    def __init__(self, *, temperature: float, top_p: float, seed: int, banned: np.ndarray | None,
                 alignment: Alignment):
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.banned = banned
        self.alignment = alignment
        self._t = max(temperature, 1e-4)
        self._reach = TAIL * max(1.0, self._t)  # what the log-sum-exp (TAIL) and the nucleus (TAIL·t) look at
        self._banned_mask: np.ndarray | None = None
        self._rngs: dict[int, np.random.Generator] = {}  # made when a branch first samples (greedy never does)
        self._logits: np.ndarray | None = None
        self._rows: _Rows | None = None  # this step's reduction, made at its first unconstrained pick
        # per step, per row: branches sharing a row share this work
        self._row_logits: dict[int, np.ndarray] = {}
        self._row_lse: dict[int, float] = {}
        self._row_nucleus: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._constrained: dict[tuple[int, bytes], list] = {}  # (row, remaining) -> ids, logits, lse, nucleus
        self._constrained_ids: dict[tuple[bytes, int], np.ndarray] = {}  # kept across steps

    def start_step(self, logits: np.ndarray) -> None:
        self._logits = logits
        self._rows = None
        self._row_logits.clear()
        self._row_lse.clear()
        self._row_nucleus.clear()
        self._constrained.clear()

    def _rng(self, branch: int) -> np.random.Generator:
        rng = self._rngs.get(branch)
        if rng is None:
            rng = self._rngs[branch] = np.random.default_rng(self.seed * 1000 + branch)
        return rng

    def _full_row(self, row: int) -> np.ndarray:
        """The row with the banned ids at -inf (a copy of its own)."""
        lg = self._row_logits.get(row)
        if lg is None:
            lg = np.array(self._logits[row], dtype=np.float32)
            if self.banned is not None:
                lg[self.banned] = -np.inf
            self._row_logits[row] = lg
        return lg

    def _reduced(self) -> _Rows | _TopReduced:
        if self._rows is None and isinstance(self._logits, TopRows):
            self._rows = _TopReduced(self._logits)
        if self._rows is None:
            logits = np.asarray(self._logits, dtype=np.float32)
            banned_mask = self._banned(logits.shape[1]) if self.banned is not None else None
            self._rows = _Rows(logits, banned_mask, self._reach)
        return self._rows

    def pick(self, branch: int, row: int, remaining: bytes) -> tuple[int, float]:
        """(token, its log-probability) for a branch fed `row` that must still re-create
        `remaining` of the backed-off text."""
        if bool(remaining) and self.alignment.trie is not None:
            return self._pick_constrained(branch, row, remaining)
        reduced = self._reduced()
        if not reduced.has[row]:
            return self._pick_full(branch, row)
        ids, values, m = reduced.row(row)
        lse = self._row_lse.get(row)
        if lse is None and reduced.lse is not None:
            lse = self._row_lse[row] = float(reduced.lse[row])
        if lse is None:
            mf = float(m)
            lse = self._row_lse[row] = mf + float(np.log(np.exp(values[values >= mf - TAIL] - mf).sum()))
        if branch == 0:
            i = int(np.argmax(values))  # the first of equal bests, as argmax over the row
            return int(ids[i]), float(values[i]) - lse
        nucleus = self._row_nucleus.get(row)  # branches sharing a row draw from one nucleus
        if nucleus is None:
            nucleus = self._row_nucleus[row] = _nucleus_of(ids, values, m, self._t, self.top_p)
        tok = _draw(nucleus, self._rng(branch))
        return tok, float(values[np.searchsorted(ids, tok)]) - lse

    def _pick_constrained(self, branch: int, row: int, remaining: bytes) -> tuple[int, float]:
        """pick over the row's tokens that agree with `remaining` only: the finite entries of
        alignment.constrain's row, in the same order, so the same log-sum-exp, argmax and
        nucleus (a gather of a few ids instead of passes over the vocabulary)."""
        key = (row, remaining)
        hit = self._constrained.get(key)
        if hit is None:
            logits = self._logits
            gathered = isinstance(logits, TopRows) and logits.vocab is not None  # only those ids leave the device
            row_logits = None if gathered else logits[row]
            vocab = logits.vocab if gathered else row_logits.shape[-1]
            ids = self.constrained_ids(remaining, vocab)
            if gathered:
                values = np.array(logits.gather(row, ids), dtype=np.float32)
            else:
                values = np.asarray(row_logits, dtype=np.float32)[ids]
            if not len(ids) or not np.isfinite(values.max()):  # nothing allowed: the whole row's answer
                lg = self.alignment.constrain(self._full_row(row), remaining)
                lse = _logsumexp(lg)
                tok = int(np.argmax(lg)) if branch == 0 else _sample(lg, self._rng(branch), self.temperature,
                                                                    self.top_p)
                return tok, float(lg[tok]) - lse
            hit = self._constrained[key] = [ids, values, _logsumexp(values), None]
        ids, values, lse, nucleus = hit
        if branch == 0:
            i = int(np.argmax(values))
            return int(ids[i]), float(values[i]) - lse
        if nucleus is None:
            m = values.max()
            near = values >= m - TAIL * self._t
            nucleus = hit[3] = _nucleus_of(ids[near], values[near], m, self._t, self.top_p)
        tok = _draw(nucleus, self._rng(branch))
        return tok, float(values[np.searchsorted(ids, tok)]) - lse

    def constrained_ids(self, remaining: bytes, vocab: int) -> np.ndarray:
        """The ascending ids below `vocab` that agree with `remaining` and are not banned:
        what a constrained pick reads. The same array for the same arguments (a request
        re-creates one or two texts), so that a gather fetched with the step is found by
        identity (DecodeStep.gather)."""
        key = (remaining, vocab)
        ids = self._constrained_ids.get(key)
        if ids is None:
            ids = self.alignment.allowed(remaining, vocab)
            if self.banned is not None and len(ids):  # banned ids are never picked: not read either
                ids = ids[~self._banned(vocab)[ids]]
            if len(self._constrained_ids) >= CONSTRAINED_IDS_KEPT:
                self._constrained_ids.clear()
            self._constrained_ids[key] = ids
        return ids

    def _banned(self, vocab: int) -> np.ndarray:
        """The banned ids as a mask over at least `vocab` ids (read-only: shared by the
        samplers of every request that bans the same array, as an engine's all do)."""
        if self._banned_mask is None or len(self._banned_mask) < vocab:
            self._banned_mask = _banned_mask(self.banned, vocab)
        return self._banned_mask

    def _pick_full(self, branch: int, row: int) -> tuple[int, float]:
        """pick over the whole row (its best token is banned)."""
        lg = self._full_row(row)
        lse = self._row_lse.get(row)
        if lse is None:
            lse = self._row_lse[row] = _logsumexp(lg)
        if branch == 0:
            tok = int(np.argmax(lg))
        else:
            nucleus = self._row_nucleus.get(row)
            if nucleus is None:
                nucleus = self._row_nucleus[row] = _nucleus(lg, self.temperature, self.top_p)
            tok = _draw(nucleus, self._rng(branch))
        return tok, float(lg[tok]) - lse


PER_ARRAY_KEPT = 8  # values kept per_array: an engine bans one or two arrays


def per_array(cache: dict, array, make):
    """make(), kept in `cache` for this very array object (by identity: an engine hands every
    request the same banned array), at most PER_ARRAY_KEPT of them."""
    kept = cache.get(id(array))
    if kept is not None and kept[0] is array:
        return kept[1]
    value = make()
    if len(cache) >= PER_ARRAY_KEPT:
        cache.clear()
    cache[id(array)] = (array, value)
    return value


_BANNED_MASKS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _banned_mask(banned: np.ndarray, vocab: int) -> np.ndarray:
    """The read-only mask of a banned-ids array over `vocab` ids, made once per array: a
    request's sampler needs it at its first constrained pick, on the scheduler thread
    (0.3-0.5 ms for the stand-in vocabulary's 151,800 banned placeholders)."""
    def make() -> np.ndarray:
        mask = np.zeros(vocab, dtype=bool)
        mask[banned] = True
        mask.flags.writeable = False
        return mask

    mask = per_array(_BANNED_MASKS, banned, make)
    if len(mask) < vocab:  # asked over a larger vocabulary than before
        _BANNED_MASKS.pop(id(banned), None)
        mask = per_array(_BANNED_MASKS, banned, make)
    return mask


def pick_many(steps: Sequence[tuple[Sampler, TopRows, Sequence[tuple[int, int]]]]) -> list[list[tuple[int, float]]]:
    """Sampler.pick for many requests' steps at once: per step its sampler, its TopRows and
    the (branch, row) pairs to pick for (no branch re-creating backed-off text). One pass
    of numpy calls over the rows of all steps instead of a few calls per row: the same
    tokens and log-probabilities (every float op in the dtype the per-row pick uses)."""
    if not steps:
        return []
    counts = [len(top) for _, top, _ in steps]
    first_row = [0] * len(steps)
    for i in range(1, len(steps)):
        first_row[i] = first_row[i - 1] + counts[i - 1]
    values = np.concatenate([top.values for _, top, _ in steps]).astype(np.float32, copy=False)  # (R, K)
    ids = np.concatenate([top.ids for _, top, _ in steps])
    lse = np.concatenate([top.lse for _, top, _ in steps]).astype(np.float64)
    greedy = values.argmax(axis=1)  # the first of equal bests
    every = np.arange(len(values))
    greedy_lp = (values[every, greedy].astype(np.float64) - lse).tolist()
    greedy_ids = ids[every, greedy].tolist()
    # the sampled branches' rows (a greedy-only row needs no nucleus) and their uniforms
    draws_rows, draws_u, slot_of, step_of = [], [], {}, []  # slot_of: row -> its place in `rows`
    for k, ((sampler, _, wants), row0) in enumerate(zip(steps, first_row, strict=True)):
        for branch, row in wants:
            if branch != 0:
                r = row0 + row
                if r not in slot_of:
                    slot_of[r] = len(step_of)
                    step_of.append(k)
                draws_rows.append(r)
                draws_u.append(sampler._rng(branch).random())
    if draws_rows:
        rows = np.fromiter(slot_of, dtype=np.int64, count=len(slot_of))
        inverse = np.fromiter((slot_of[r] for r in draws_rows), dtype=np.int64, count=len(draws_rows))
        params = {(s._t, s.top_p) for s, _, _ in steps}
        if len(params) == 1:  # one setting for all (the usual): scalars, no per-row arrays
            (t0, p0), = params
            t = np.float32(t0)
            # the per-row pick's thresholds: TAIL·t in double, then rounded to float32 (a
            # Python float meeting a float32 array), as top_p is
            reach, top_p = np.float32(TAIL * t0), np.float32(p0)
        else:
            t = np.array([steps[k][0]._t for k in step_of], dtype=np.float32)[:, None]
            reach = np.array([TAIL * steps[k][0]._t for k in step_of], dtype=np.float64).astype(np.float32)
            top_p = np.array([steps[k][0].top_p for k in step_of], dtype=np.float64).astype(np.float32)
        v = values[rows]
        best = v[np.arange(len(rows)), greedy[rows]]
        inside = v >= (best - reach)[:, None]
        order = np.argsort(np.where(inside, -v, np.inf), axis=1, kind="stable")  # best first, the rest last
        order += (np.arange(len(rows)) * v.shape[1])[:, None]  # into the flat rows (one gather, not take_along_axis')
        sorted_values = v.reshape(-1)[order]
        sorted_ids = ids[rows].reshape(-1)[order]
        n_inside = inside.sum(axis=1)  # the order puts them first
        kept = np.arange(v.shape[1])[None, :] < n_inside[:, None]
        z = sorted_values / t
        weights = np.where(kept, np.exp(z - z[:, :1]), np.float32(0.0))
        c = np.cumsum(weights, axis=1)  # sequential per row: the per-row cumsum's sums, then zeros
        keep = np.minimum((c < (top_p * c[:, -1])[:, None]).sum(axis=1) + 1, n_inside)
        total = c[np.arange(len(c)), keep - 1]  # the nucleus' mass, as _draw reads it
        x = np.array(draws_u, dtype=np.float32) * total[inverse]  # float32, as rng.random() * c[-1]
        within = np.arange(c.shape[1])[None, :] < keep[inverse][:, None]
        i = np.minimum(((c[inverse] <= x[:, None]) & within).sum(axis=1), keep[inverse] - 1)
        drawn_ids = sorted_ids[inverse, i].tolist()
        drawn_lp = (sorted_values[inverse, i].astype(np.float64) - lse[np.array(draws_rows)]).tolist()
    out, d = [], 0
    for (_, _, wants), row0 in zip(steps, first_row, strict=True):
        picks = []
        for branch, row in wants:
            if branch == 0:
                picks.append((greedy_ids[row0 + row], greedy_lp[row0 + row]))
            else:
                picks.append((drawn_ids[d], drawn_lp[d]))
                d += 1
        out.append(picks)
    return out
