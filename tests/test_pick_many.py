"""pick_many, the picks of every driven loop of a step in one numpy pass, against each
request's own Sampler.pick: the same tokens and log-probabilities, bit for bit."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from codecomplete.alignment import Alignment
from codecomplete.runtime.base import TopRows
from codecomplete.sampler import TAIL, TOP_K, Sampler, pick_many


def top_rows_of(logits: np.ndarray, banned: np.ndarray | None, k: int = TOP_K) -> TopRows:
    """What a reducing runtime hands back: per row its k best allowed ids (ascending), their
    logits and the log-sum-exp within TAIL of the best."""
    rows = np.array(logits, dtype=np.float32)
    if banned is not None:
        rows[:, banned] = -np.inf
    best = np.sort(np.argsort(-rows, axis=1, kind="stable")[:, :k], axis=1)
    values = np.take_along_axis(rows, best, axis=1)
    m = rows.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.where(rows >= m - TAIL, np.exp(rows - m), 0.0).sum(axis=1))).astype(np.float32)
    return TopRows(best, values, lse, lambda index: rows[index])


def _step(rng, vocab, ties):
    rows = int(rng.integers(1, 5))
    spread = float(rng.choice([0.3, 2.0, 8.0]))
    logits = (rng.standard_normal((rows, vocab)) * spread).astype(np.float32)
    if ties:
        logits = np.round(logits)
    n = int(rng.integers(1, 7))
    active = sorted(rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False).tolist())  # finished ones left out
    wants = [(b, int(rng.integers(rows))) for b in active]
    return logits, wants


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), requests=st.integers(1, 8), ties=st.booleans(), ban=st.booleans())
def test_pick_many_picks_what_each_request_picks(seed, requests, ties, ban):
    rng = np.random.default_rng(seed)
    vocab = 500
    banned = rng.choice(vocab, size=30, replace=False) if ban else None
    specs = []
    for r in range(requests):
        specs.append(dict(temperature=float(rng.choice([0.0, 0.2, 0.8, 1.0, 1.7])),
                          top_p=float(rng.choice([0.5, 0.9, 0.95, 1.0])), seed=seed % 1000 + r))
    together = [Sampler(**s, banned=banned, alignment=Alignment(b"", None)) for s in specs]
    alone = [Sampler(**s, banned=banned, alignment=Alignment(b"", None)) for s in specs]
    for _ in range(3):  # steps: each branch's generator advances across them
        steps = [(*_step(rng, vocab, ties),) for _ in range(requests)]
        tops = [top_rows_of(logits, banned) for logits, _ in steps]
        got = pick_many([(s, top, wants) for s, top, (_, wants) in zip(together, tops, steps, strict=True)])
        for sampler, top, (_, wants), picks in zip(alone, tops, steps, got, strict=True):
            sampler.start_step(top)
            want = [sampler.pick(b, row, b"") for b, row in wants]
            assert picks == want


def test_pick_many_of_nothing_is_nothing():
    assert pick_many([]) == []


def _vocab() -> list[bytes]:
    letters = [bytes([c]) for c in b"ab _("]
    out = [b""] + letters + [x + y for x in letters for y in letters]
    return out + [x + y + z for x in letters for y in letters for z in letters[:3]]


def reference_constrained_pick(logits, banned, alignment, remaining, branch, temperature, top_p, rng):
    """The pick over a whole row: copy, ban, alignment.constrain, log-sum-exp, argmax or nucleus."""
    from codecomplete.sampler import _logsumexp, _sample

    lg = np.array(logits, dtype=np.float32)
    if banned is not None:
        lg[banned] = -np.inf
    lg = alignment.constrain(lg, remaining)
    lse = _logsumexp(lg)
    tok = int(np.argmax(lg)) if branch == 0 else _sample(lg, rng, temperature, top_p)
    return tok, float(lg[tok]) - lse


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), ties=st.booleans(), ban=st.booleans(),
       temperature=st.sampled_from([0.0, 0.3, 0.8, 1.7]), top_p=st.sampled_from([0.5, 0.95, 1.0]))
def test_a_constrained_pick_reads_only_the_allowed_ids_and_picks_what_the_masked_row_does(
        seed, ties, ban, temperature, top_p):
    from codecomplete.alignment import VocabTrie

    rng = np.random.default_rng(seed)
    vocab = _vocab()
    trie = VocabTrie(vocab)
    removed = b"".join(rng.choice([b"a", b"b", b" ", b"_", b"("], size=4).tolist())
    alignment = Alignment(removed, trie)
    banned = rng.choice(len(vocab), size=8, replace=False) if ban else None
    sampler = Sampler(temperature=temperature, top_p=top_p, seed=seed % 1000, banned=banned, alignment=alignment)
    refs: dict[int, np.random.Generator] = {}
    for _ in range(3):
        logits = (rng.standard_normal((3, len(vocab))) * 3.0).astype(np.float32)
        if ties:
            logits = np.round(logits)
        sampler.start_step(logits)
        for branch in range(6):  # branches sharing a row and its remaining text share its work
            row = branch % 3
            remaining = removed[branch % 3:]
            ref_rng = refs.setdefault(branch, np.random.default_rng((seed % 1000) * 1000 + branch))
            want = reference_constrained_pick(logits[row], banned, alignment, remaining, branch, temperature, top_p,
                                              ref_rng)
            got = sampler.pick(branch, row, remaining)
            # every allowed id banned: both answer token 0 with a NaN log-probability (-inf - -inf)
            assert got[0] == want[0] and (got[1] == want[1] or (np.isnan(got[1]) and np.isnan(want[1])))
