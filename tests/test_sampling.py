"""The decode loop's row sharing: branches with equal tokens share one runtime row."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from codecomplete.reuse import Reuse
from codecomplete.runtime.base import BranchState, ContextState
from codecomplete.sampler import TOP_K, _nucleus
from codecomplete.sampling import generate

V = 50


def pair(history: tuple[int, ...]) -> tuple[int, int]:
    """The two tokens a history allows (by a hash), the first the more likely."""
    h = hash(history) & 0xFFFFFFFF
    a = 1 + h % (V - 1)
    b = 1 + (h // V) % (V - 1)
    return a, (b if b != a else 1 + a % (V - 1))


def logits_for(history: tuple[int, ...], skew: float) -> np.ndarray:
    lg = np.full(V, -1e9, np.float32)
    a, b = pair(history)
    lg[a], lg[b] = skew, 0.0
    return lg


class HistoryRuntime:
    """Logits are a function of each row's own token history; rows keep that history, so a
    branch fed another branch's row would get tokens outside its own history's pair."""

    def __init__(self, skew: float):
        self.skew = skew
        self.tokenizer = SimpleNamespace(token_bytes=[b""] + [bytes([97 + i % 26]) for i in range(1, V)])
        self.rows_fed: list[int] = []

    def start_branches(self, context, n, max_new_tokens):
        return BranchState(n=n, max_new_tokens=max_new_tokens, kv=[() for _ in range(n)])

    def select_branches(self, branches, keep):
        return BranchState(n=len(keep), max_new_tokens=branches.max_new_tokens, step=branches.step,
                           kv=[branches.kv[i] for i in keep])

    def decode(self, context, branches, next_tokens):
        assert len(next_tokens) == branches.n
        branches.kv = [h + (t,) for h, t in zip(branches.kv, next_tokens, strict=True)]
        branches.step += 1
        self.rows_fed.append(branches.n)
        return np.stack([logits_for(h, self.skew) for h in branches.kv])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 6), steps=st.integers(1, 12), seed=st.integers(0, 1000), skew=st.sampled_from([0.0, 2.0, 8.0]))
def test_every_token_comes_from_its_own_branch_history(n, steps, seed, skew):
    rt = HistoryRuntime(skew)
    result = generate(rt, None, logits_for((), skew), n=n, max_new_tokens=steps, constraint=b"", trie=None,
                      stop_ids=set(), stop_fn=lambda visible: None, seed=seed)
    for b in result.branches:
        assert len(b.tokens) == steps
        for k, tok in enumerate(b.tokens):
            allowed = pair(tuple(b.tokens[:k]))
            assert tok in allowed
            if b.index == 0:
                assert tok == (allowed[0] if skew > 0 else min(allowed))  # greedy: the likelier (a tie: the lower id)
    # one row per distinct history: never more rows than branches, fewer when they agree
    distinct = [len({tuple(b.tokens[:k + 1]) for b in result.branches}) for k in range(steps - 1)]
    assert rt.rows_fed == distinct
    assert result.rows_decoded == sum(distinct) and result.branch_rows == n * (steps - 1)
    # the trace finds every path a branch was fed, in a row that was fed exactly that path,
    # with the logits that followed it (what the next keystroke adopts instead of a prefill)
    for b in result.branches:
        for k in range(1, steps):
            found = result.trace.find(b.tokens[:k])
            assert found.offset == 0 and tuple(found.branches.kv[found.row][:k]) == tuple(b.tokens[:k])
            np.testing.assert_array_equal(found.logits, logits_for(tuple(b.tokens[:k]), skew))
    assert result.trace.find([]) is None and result.trace.find([0] * steps) is None


def test_equal_branches_share_a_row():
    # a model sure of every token: all four candidates are the greedy one, decoded as one row
    rt = HistoryRuntime(skew=60.0)
    result = generate(rt, None, logits_for((), 60.0), n=4, max_new_tokens=6, constraint=b"", trie=None,
                      stop_ids=set(), stop_fn=lambda visible: None, seed=3)
    assert len({tuple(b.tokens) for b in result.branches}) == 1
    assert rt.rows_fed == [1] * 5 and result.rows_decoded == 5 and result.branch_rows == 20


class PrefixRuntime(HistoryRuntime):
    """Logits are a function of the whole token sequence, context included; branch_from
    checks the contract: the new context is the old one followed by the skipped tokens."""

    reuses_branches = True

    def __init__(self, skew: float):
        super().__init__(skew)
        self.decode_calls = 0

    def start_branches(self, context, n, max_new_tokens):
        return BranchState(n=n, max_new_tokens=max_new_tokens, kv=[tuple(context.tokens)] * n,
                           extra={"context": len(context.tokens)})

    def select_branches(self, branches, keep):
        out = super().select_branches(branches, keep)
        out.extra = dict(branches.extra)
        return out

    def decode(self, context, branches, next_tokens):
        self.decode_calls += 1
        return super().decode(context, branches, next_tokens)

    def branch_from(self, context, branches, rows, start, steps, max_new_tokens):
        at = branches.extra["context"] + start
        assert all(branches.kv[r][:at] == tuple(context.tokens) for r in rows)
        return BranchState(n=len(rows), max_new_tokens=max_new_tokens, step=steps,
                           kv=[branches.kv[r][:at + steps] for r in rows], extra={"context": len(context.tokens)})


def _generate(rt, context, seed, steps, n, reuse=None):
    return generate(rt, ContextState(list(context)), logits_for(tuple(context), rt.skew), n=n, max_new_tokens=steps,
                    constraint=b"", trie=None, stop_ids=set(), stop_fn=lambda visible: None, seed=seed, reuse=reuse)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 5), steps=st.integers(2, 10), seed=st.integers(0, 1000), seed2=st.integers(0, 1000),
       skew=st.sampled_from([0.0, 2.0, 8.0]), pick=st.integers(0, 4), k=st.integers(0, 3))
def test_steps_taken_from_the_last_trace_give_the_same_tokens_as_decoding(n, steps, seed, seed2, skew, pick, k):
    context = (7, 8, 9)
    first = _generate(PrefixRuntime(skew), context, seed, steps, n)
    ext = tuple(first.branches[pick % n].tokens[:min(k, steps - 1)])  # the user typed what a branch began with
    fresh_rt, reuse_rt = PrefixRuntime(skew), PrefixRuntime(skew)
    fresh = _generate(fresh_rt, context + ext, seed2, steps, n)
    reused = _generate(reuse_rt, context + ext, seed2, steps, n, reuse=Reuse(first.trace, ext))
    assert [b.tokens for b in reused.branches] == [b.tokens for b in fresh.branches]
    assert reused.steps + reused.served_steps == fresh.steps == fresh_rt.decode_calls
    assert reuse_rt.decode_calls == reused.steps
    if not ext and seed2 == seed:  # the same request again: every step comes from the trace
        assert reused.steps == 0
    # the new trace serves a third keystroke too, served steps included
    again = _generate(PrefixRuntime(skew), context + ext, seed2, steps, n, reuse=Reuse(reused.trace, ()))
    assert again.steps == 0 and [b.tokens for b in again.branches] == [b.tokens for b in fresh.branches]


def reference_nucleus(logits: np.ndarray, temperature: float, top_p: float) -> list[int]:
    """Nucleus over the TOP_K best tokens, from a full sort of the vocabulary."""
    order = np.argsort(-logits, kind="stable")[:TOP_K]
    p = np.exp((logits[order] - logits[order[0]]) / temperature)
    c = np.cumsum(p)
    keep = min(int(np.searchsorted(c, top_p * c[-1]) + 1), len(order))
    return sorted(order[:keep].tolist())


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), spread=st.floats(0.05, 30.0), masked=st.floats(0.0, 0.99),
       temperature=st.sampled_from([0.2, 0.8, 1.0, 1.5]), top_p=st.sampled_from([0.5, 0.9, 0.95, 1.0]))
def test_nucleus_matches_a_full_sort_of_the_vocabulary(seed, spread, masked, temperature, top_p):
    # only tokens near the best are ranked: the set must be what a sort of everything gives
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(3000) * spread).astype(np.float32)
    logits[rng.random(3000) < masked] = -np.inf  # banned ids and alignment masks
    logits[rng.integers(3000)] = logits.max() + 1.0  # a finite best
    top, c = _nucleus(logits, temperature, top_p)
    assert sorted(top.tolist()) == reference_nucleus(logits, temperature, top_p)
    assert len(c) == len(top) and np.all(np.diff(c) >= 0)
    assert list(top) == sorted(top, key=lambda t: -logits[t])  # best first


def _loop(rt, context, seed, steps, n):
    from codecomplete.alignment import Alignment
    from codecomplete.sampler import Sampler
    from codecomplete.sampling import DecodeLoop

    alignment = Alignment(b"", None)
    sampler = Sampler(temperature=0.8, top_p=0.95, seed=seed, banned=None, alignment=alignment)
    return DecodeLoop(rt, ContextState(list(context)), logits_for(tuple(context), rt.skew), n=n,
                      max_new_tokens=steps, alignment=alignment, sampler=sampler, stop_ids=set(),
                      stop_bytes=lambda visible: None)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 4), steps=st.integers(1, 8), seed=st.integers(0, 1000))
def test_two_loops_stepped_in_turn_from_outside_give_what_generate_gives(n, steps, seed):
    """A scheduler advances each request's loop one step at a time, interleaving them:
    each must end with the tokens a plain generate gives."""
    contexts = ((7, 8, 9), (3, 4))
    runtimes = [PrefixRuntime(2.0) for _ in contexts]
    loops = [_loop(rt, c, seed + i, steps, n) for i, (rt, c) in enumerate(zip(runtimes, contexts, strict=True))]
    going = [True] * len(loops)
    while any(going):
        for i, loop in enumerate(loops):  # prepare next tokens -> runtime decode -> consume logits
            if going[i] and loop.sample():
                assert loop.prepare()  # no trace to serve from: every step is a decode
                assert loop.branches.n == len(loop.next_tokens)
                loop.accept(runtimes[i].decode(loop.context, loop.branches, loop.next_tokens))
            else:
                going[i] = False
    for i, (loop, c) in enumerate(zip(loops, contexts, strict=True)):
        want = _generate(PrefixRuntime(2.0), c, seed + i, steps, n)
        got = loop.result()
        assert [b.tokens for b in got.branches] == [b.tokens for b in want.branches]
        assert got.steps == want.steps == runtimes[i].decode_calls
        assert {b.stop_reason for b in got.branches} == {"max_tokens"}


def test_the_log_probability_of_a_150k_row_keeps_to_the_exact_one():
    """The sampler's log-sum-exp reads only the tokens near the best: on a Qwen-sized row
    it errs by less than 1e-3 nats, even when most of the vocabulary sits just past the cut."""
    from codecomplete.sampler import TAIL, _logsumexp

    rng = np.random.default_rng(0)
    for spread in (3.0, 10.0):
        row = (rng.standard_normal(151_936) * spread).astype(np.float32)
        row[rng.integers(0, len(row), 20)] = np.float32(-np.inf)  # banned or masked tokens
        exact = float(np.logaddexp.reduce(row.astype(np.float64)))
        assert abs(_logsumexp(row) - exact) < 1e-3
    crowded = np.full(151_936, -TAIL - 1e-3, np.float32)  # the worst case: all mass just below the cut
    crowded[0] = 0.0
    assert abs(_logsumexp(crowded) - float(np.logaddexp.reduce(crowded.astype(np.float64)))) < 1e-3


def reference_pick(logits: np.ndarray, banned, branch: int, temperature: float, top_p: float,
                   rng: np.random.Generator) -> tuple[int, float]:
    """The per-row pick: copy the row, ban, log-sum-exp, then argmax or the nucleus draw."""
    from codecomplete.sampler import _draw, _logsumexp

    lg = np.array(logits, dtype=np.float32)
    if banned is not None:
        lg[banned] = -np.inf
    lse = _logsumexp(lg)
    tok = int(np.argmax(lg)) if branch == 0 else _draw(_nucleus(lg, temperature, top_p), rng)
    return tok, float(lg[tok]) - lse


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 6), spread=st.sampled_from([0.5, 3.0, 12.0, 40.0]),
       temperature=st.sampled_from([0.2, 0.8, 1.0, 1.7]), top_p=st.sampled_from([0.5, 0.95, 1.0]),
       ban=st.sampled_from(["none", "some", "best"]), ties=st.booleans())
def test_the_step_wide_sampler_picks_what_the_per_row_pick_does(seed, rows, spread, temperature, top_p, ban, ties):
    """Sampler reduces a step's rows (max, comparison, the ids near the best; flat rows
    one by one, peaked ones all at once: spread 40 keeps few tokens near the best) and picks
    from that: the same tokens and log-probabilities as the per-row pick over the whole
    row, with banned ids (a banned best too), ties and shared rows."""
    from codecomplete.alignment import Alignment
    from codecomplete.sampler import Sampler

    rng = np.random.default_rng(seed)
    vocab = 3000
    logits = (rng.standard_normal((rows, vocab)) * spread).astype(np.float32)
    if ties:
        logits = np.round(logits)
    banned = None
    if ban != "none":
        banned = rng.choice(vocab, size=40, replace=False)
        if ban == "best":
            banned = np.union1d(banned, logits.argmax(axis=1))
    sampler = Sampler(temperature=temperature, top_p=top_p, seed=seed, banned=banned, alignment=Alignment(b"", None))
    refs: dict[int, np.random.Generator] = {}
    for _ in range(3):  # steps: each branch's generator advances across them
        sampler.start_step(logits)
        for branch in range(6):
            row = branch % rows
            ref_rng = refs.setdefault(branch, np.random.default_rng(seed * 1000 + branch))
            want = reference_pick(logits[row], banned, branch, temperature, top_p, ref_rng)
            got = sampler.pick(branch, row, b"")
            assert got[0] == want[0]
            assert got[1] == want[1]
        logits = np.roll(logits, 7, axis=1)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), ban_share=st.sampled_from([0.0, 0.3, 0.9]))
def test_a_constrained_pick_is_the_masked_rows_pick_whole_rows_or_gathered(seed, ban_share):
    """A branch still re-creating backed-off text picks among the ids that agree with it
    and are not banned (banned ones are not even read): greedy, the masked row's argmax and
    log-probability; the same picks whether the sampler holds whole rows or the device's
    reduced rows (TopRows, gathering those ids)."""
    from codecomplete.alignment import Alignment, VocabTrie
    from codecomplete.runtime.base import TopRows
    from codecomplete.sampler import Sampler, _logsumexp

    rng = np.random.default_rng(seed)
    alphabet = b"ab( "
    vocab = [bytes(alphabet[x] for x in rng.integers(0, len(alphabet), rng.integers(1, 4))) for _ in range(400)]
    trie = VocabTrie(vocab)
    remaining = bytes(alphabet[x] for x in rng.integers(0, len(alphabet), 3))
    logits = (rng.standard_normal((3, len(vocab))) * 3).astype(np.float32)
    banned = np.flatnonzero(rng.random(len(vocab)) < ban_share).astype(np.int64)
    allowed = trie.mask(remaining) & ~np.isin(np.arange(len(vocab)), banned)
    top = np.sort(np.argsort(-logits, axis=1)[:, :8], axis=1)
    rows = TopRows(top, np.take_along_axis(logits, top, axis=1), logits.max(axis=1), lambda index: logits[index],
                   gather=lambda r, ids: logits[r, ids], vocab=len(vocab))
    picks = []
    for held in (logits, rows):
        sampler = Sampler(temperature=0.8, top_p=0.95, seed=seed, banned=banned if len(banned) else None,
                          alignment=Alignment(remaining, trie))
        sampler.start_step(held)
        picks.append([sampler.pick(b, r, remaining) for r in range(3) for b in range(3)])
    # (nothing allowed at all: both pick from the all -inf row, a nan log-probability)
    assert [t for t, _ in picks[0]] == [t for t, _ in picks[1]]
    assert np.array_equal([lp for _, lp in picks[0]], [lp for _, lp in picks[1]], equal_nan=True)
    for r in range(3):
        if allowed.any():
            masked = np.where(allowed, logits[r], -np.inf)
            token, logprob = picks[0][3 * r]
            assert token == int(np.argmax(masked)) and abs(logprob - (masked[token] - _logsumexp(masked))) < 1e-5
            assert all(allowed[t] for t, _ in picks[0][3 * r:3 * r + 3])


def test_samplers_banning_one_array_share_its_mask_read_only():
    """Every request of an engine bans the same array: its mask is made once (on the
    scheduler thread, at a request's first constrained pick), not per request."""
    from codecomplete.alignment import Alignment
    from codecomplete.sampler import Sampler

    banned, other = np.arange(5, 900, dtype=np.int64), np.arange(5, 900, dtype=np.int64)
    one, two, three = (Sampler(temperature=0.8, top_p=0.95, seed=s, banned=b, alignment=Alignment(b"", None))
                       for s, b in ((0, banned), (1, banned), (2, other)))
    mask = one._banned(1000)
    assert two._banned(1000) is mask and three._banned(1000) is not mask
    assert np.flatnonzero(mask).tolist() == banned.tolist() and not mask.flags.writeable
    assert len(one._banned(2000)) == 2000 and one._banned(2000)[899] and not one._banned(2000)[1500]
