"""The host side of the batched decode: the scheduler steps each request's decode loop on
its own thread (answers equal the loop stepped in the request's thread), and a torch
runtime's rows reduced where they are computed (TopRows) pick what the whole rows pick."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_batching import DOCUMENTS, _answer, _together  # noqa: E402  (tests/ is on sys.path under pytest)

from codecomplete.alignment import Alignment  # noqa: E402
from codecomplete.engine import Engine  # noqa: E402
from codecomplete.request import CompletionOptions, CompletionRequest  # noqa: E402
from codecomplete.runtime import TopRows, load_runtime  # noqa: E402
from codecomplete.runtime.base import BranchState, ContextState, DecodeStep  # noqa: E402
from codecomplete.runtime.torch_graphs import reduce_rows  # noqa: E402
from codecomplete.sampler import TAIL, TOP_K, Sampler  # noqa: E402


def _requests(n: int = 5) -> list[CompletionRequest]:
    out = []
    for i in range(n):
        doc = i % len(DOCUMENTS)
        text = DOCUMENTS[doc]
        offset = min(len(text), 40 + 37 * i)
        opts = CompletionOptions(n=(1, 2, 4)[i % 3], max_new_tokens=(3, 8, 12)[i % 3], deadline_ms=60_000,
                                 seed=i, patience_steps=(None, 2)[i % 2])
        out.append(CompletionRequest(text=text, offset=offset, language="python", path=f"u{i}/d{doc}.py",
                                     options=opts))
    return out


@pytest.mark.parametrize("reduce", [False, True])
def test_loops_driven_by_the_scheduler_answer_as_loops_in_their_own_threads(tiny_model_dir, reduce):
    """drive_loops (the default) against drive_loops=False, the same requests at once; with
    reduce the torch runtime hands the driven loops TopRows instead of whole rows."""
    answers = {}
    for drive in (False, True):
        rt = load_runtime(str(tiny_model_dir), runtime="torch")
        rt.reduces_rows = reduce
        engine = Engine(rt, batching="on", prefill_chunk_tokens=24, drive_loops=drive)
        try:
            answers[drive] = _together(engine, _requests(), [0.0, 0.01, 0.0, 0.02, 0.005])
            records = engine.scheduler.stats.decode_records()
        finally:
            engine.close()
        assert max(len(r.rows) for r in records) >= 2
    for a, b in zip(answers[False], answers[True], strict=True):
        assert not isinstance(b, Exception), b
        assert _answer(b) == _answer(a)
        assert b.tokens_generated == a.tokens_generated


def test_one_typist_on_reduced_rows_answers_as_on_whole_rows(tiny_model_dir):
    """Without batching, a runtime that reduces rows (the torch runtime on CUDA) steps each
    request's branches on TopRows, picked in one pass: the same answers as on whole rows,
    keystroke by keystroke (typing through words, so back-offs re-create text, and steps
    served from the last keystroke's trace)."""
    text = DOCUMENTS[0]
    start = text.index("return") + 2
    requests = [CompletionRequest(text=text[:o] + text[start + 12:], offset=o, language="python", path="t.py",
                                  options=CompletionOptions(n=4, max_new_tokens=8, deadline_ms=60_000, seed=1,
                                                            patience_steps=2))
                for o in range(start, start + 12)] + _requests(4)
    answers, reduced_steps = {}, 0
    for reduce in (False, True):
        rt = load_runtime(str(tiny_model_dir), runtime="torch")
        rt.reduces_rows = reduce
        top = rt.decode_many_top

        def counting(*args, top=top, **kwargs):
            nonlocal reduced_steps
            out = top(*args, **kwargs)
            reduced_steps += sum(isinstance(o, TopRows) for o in out)
            return out

        rt.decode_many_top = counting
        engine = Engine(rt)
        answers[reduce] = [(_answer(c), c.tokens_generated, c.source) for c in map(engine.complete, requests)]
    assert reduced_steps > 10  # the reducing engine did decode on TopRows
    assert answers[True] == answers[False]
    assert {s for _, _, s in answers[False]} >= {"warm", "cold"}


def test_an_error_inside_a_driven_loop_fails_that_request_only(tiny_model_dir):
    rt = load_runtime(str(tiny_model_dir), runtime="torch")
    start = rt.start_branches

    def failing_start(context, n, max_new_tokens):  # called by the third request's loop on the scheduler thread
        if max_new_tokens >= 12:  # its 12 tokens and the back-off's (the others ask for 3 and 8)
            raise RuntimeError("no room for the branches")
        return start(context, n, max_new_tokens)

    rt.start_branches = failing_start
    engine = Engine(rt, batching="on")
    try:
        requests = _requests(3)
        out = _together(engine, requests, [0.0, 0.0, 0.0])
        assert engine.scheduler.alive
    finally:
        engine.close()
    assert [r.options.max_new_tokens for r in requests] == [3, 8, 12]
    assert isinstance(out[2], RuntimeError) and "no room" in str(out[2])
    assert all(not isinstance(a, Exception) and a.tokens_generated for a in out[:2])


def test_top_rows_of_a_step_hold_its_best_tokens_and_whole_rows(tiny_model_dir):
    rt = load_runtime(str(tiny_model_dir), runtime="torch")
    rng = np.random.default_rng(0)
    logits = torch.from_numpy((rng.standard_normal((5, rt.config.vocab_size)) * 4).astype(np.float32))
    banned = np.array([int(logits[0].argmax()), 3, 7])
    mask = rt._banned_mask(banned)
    state = ContextState([1, 2, 3])
    steps = [DecodeStep(state, BranchState(n=2, max_new_tokens=4), [0, 0]),
             DecodeStep(state, BranchState(n=3, max_new_tokens=4), [0, 0, 0])]
    first, second = reduce_rows(logits, steps, mask, TOP_K, TAIL, torch.float32)
    assert isinstance(first, TopRows) and (len(first), len(second)) == (2, 3)
    assert np.array_equal(first.full(), logits[:2].numpy()) and np.array_equal(second.full(), logits[2:].numpy())
    assert np.array_equal(second[0], logits[2].numpy())
    sub = second[[2, 0]]
    assert np.array_equal(sub.full(), logits[[4, 2]].numpy())
    original = logits.clone()
    logits.fill_(0.0)  # a graph's output buffer, overwritten by the next step: the rows kept are copies
    assert np.array_equal(sub.full(), original[[4, 2]].numpy())
    logits = original
    top = TopRows(np.concatenate([first.ids, second.ids]), np.concatenate([first.values, second.values]),
                  np.concatenate([first.lse, second.lse]), None)
    for r in range(5):
        row = logits[r].numpy().copy()
        row[banned] = -np.inf
        best = np.sort(np.argsort(-row, kind="stable")[:TOP_K])
        assert np.array_equal(top.ids[r], best)
        assert np.array_equal(top.values[r], row[best])
        m = row.max()
        near = row[row >= m - TAIL]
        assert abs(top.lse[r] - (m + np.log(np.exp(near - m).sum()))) < 1e-4


def test_logits_a_step_asks_for_come_with_its_reduction(tiny_model_dir):
    """DecodeStep.gather: the ids a constrained pick will read come back with the step's
    reduction, the same numbers as the whole rows' (TopRows.gather answers without a
    round trip of its own, sub-rows included); other ids, rows out of range and bad ids
    fall back to the device rows."""
    rt = load_runtime(str(tiny_model_dir), runtime="torch")
    vocab = rt.config.vocab_size
    rng = np.random.default_rng(3)
    logits = torch.from_numpy((rng.standard_normal((5, vocab)) * 4).astype(np.float32))
    state = ContextState([1, 2, 3])
    wanted = np.array([2, 5, 9, vocab - 1])
    other = np.array([0, 4])
    steps = [DecodeStep(state, BranchState(n=2, max_new_tokens=4), [0, 0], {1: wanted, 7: other}),
             DecodeStep(state, BranchState(n=3, max_new_tokens=4), [0, 0, 0], {0: other, 2: wanted,
                                                                              1: np.array([3, vocab])}),
             ]
    first, second = reduce_rows(logits, steps, None, TOP_K, TAIL, torch.float32)
    trips = []
    for rows in (first, second):
        real = rows._gather
        rows._gather = lambda r, ids, real=real: trips.append((r, len(ids))) or real(r, ids)
    assert np.array_equal(first.gather(1, wanted), logits[1, wanted].numpy())
    assert np.array_equal(second.gather(2, wanted), logits[4, wanted].numpy())
    assert np.array_equal(second.gather(0, other.copy()), logits[2, other].numpy())  # equal ids, another array
    assert np.array_equal(second[[2, 0]].gather(0, wanted), logits[4, wanted].numpy())  # rows of the step's rows
    assert trips == []
    assert np.array_equal(first.gather(0, wanted), logits[0, wanted].numpy())  # not asked for: fetched
    assert np.array_equal(second.gather(2, other), logits[4, other].numpy())
    assert trips == [(0, 4), (2, 2)]
    with pytest.raises(IndexError):  # an id outside the vocabulary was not fetched with the step: its own error
        second.gather(1, np.array([3, vocab]))


def test_constrained_picks_read_the_logits_fetched_with_their_step(tiny_model_dir):
    """Typing through words (each keystroke backs off and re-creates text) on a runtime
    that reduces rows, batched and not: every constrained pick's logits came with its step
    (no gather of its own), a typed keystroke's first pick's with the decode step it rode,
    and the answers are those of whole rows. (Steps served from the last keystroke's trace
    ride no step: reuse is off here.)"""
    import threading

    text = DOCUMENTS[0]
    start = text.index("return") + 2

    def typing(seed: int) -> list[CompletionRequest]:
        return [CompletionRequest(text=text[:o] + text[start + 10:], offset=o, language="python", path=f"g{seed}.py",
                                  options=CompletionOptions(n=3, max_new_tokens=6, deadline_ms=60_000, seed=seed))
                for o in range(start, start + 10)]

    def answers(engine, seed):
        return [(_answer(c), c.tokens_generated) for c in map(engine.complete, typing(seed))]

    whole = {}
    for seed in (0, 1):
        engine = Engine(load_runtime(str(tiny_model_dir), runtime="torch"))
        engine.exact_new_tokens, engine.reuse_keystrokes = 4, False
        whole[seed] = answers(engine, seed)
    hits, trips = [], []
    real_gather = TopRows.gather

    def gather(self, row, ids, real_gather=real_gather):
        known = self._gathered.get(int(self._index[int(row)]))
        (hits if known is not None and known[0] is ids else trips).append(row)
        return real_gather(self, row, ids)

    TopRows.gather = gather
    try:
        for batching in ("off", "on"):
            rt = load_runtime(str(tiny_model_dir), runtime="torch")
            rt.reduces_rows = True
            engine = Engine(rt, batching=batching, rerank_workers=0)
            engine.exact_new_tokens, engine.reuse_keystrokes = 4, False
            got = {}
            try:
                users = [threading.Thread(target=lambda s=s, got=got, engine=engine: got.__setitem__(s, answers(engine, s)))
                         for s in (0, 1)]
                for u in users:
                    u.start()
                for u in users:
                    u.join()
            finally:
                engine.close()
            assert got == whole, batching
    finally:
        TopRows.gather = real_gather
    assert len(hits) > 10 and trips == []


def test_the_sampler_picks_from_top_rows_what_it_picks_from_whole_rows(tiny_model_dir):
    """decode_many_top on CPU torch (reduces_rows forced on) against decode_many: the same
    tokens for greedy and sampled branches, log-probabilities to float tolerance."""
    rt = load_runtime(str(tiny_model_dir), runtime="torch")
    rt.reduces_rows = True
    engine = Engine(rt)
    prompt = engine.prompts.build(_requests(1)[0], 8).tokens
    banned = engine.banned_ids if len(engine.banned_ids) else None
    state, _ = rt.prefill(prompt)
    whole, reduced = rt.start_branches(state, 4, 8), rt.start_branches(state, 4, 8)
    tokens = [5, 9, 11, 5]
    for step in range(4):
        full_out = rt.decode_many([DecodeStep(state, whole, tokens)])[0]
        top_out = rt.decode_many_top([DecodeStep(state, reduced, tokens)], [False], banned, TOP_K, TAIL)[0]
        assert isinstance(top_out, TopRows) and top_out.banned is banned  # what the rows were reduced under
        picks = []
        for logits in (full_out, top_out):
            sampler = Sampler(temperature=0.8, top_p=0.95, seed=step, banned=banned, alignment=Alignment(b"", None))
            sampler.start_step(logits)
            picks.append([sampler.pick(b, b, b"") for b in range(4)])
        assert [t for t, _ in picks[0]] == [t for t, _ in picks[1]]
        assert np.allclose([lp for _, lp in picks[0]], [lp for _, lp in picks[1]], atol=1e-4)
        tokens = [t for t, _ in picks[0]]
    whole_again = rt.decode_many_top([DecodeStep(state, reduced, tokens)], [True], banned, TOP_K, TAIL)[0]
    assert isinstance(whole_again, np.ndarray) and whole_again.shape == (4, rt.config.vocab_size)


class _TableStep:
    """A stand-in for VarlenDecoder (no Triton): a step's logits are a fixed table's rows
    of the rows' tokens (padding rows: token 0), so a replay's answer is known."""

    def __init__(self, rt):
        from codecomplete.models.varlen_triton import TOKEN

        self.rt, self.token_field = rt, TOKEN
        self.scratch_k = torch.zeros((rt.config.n_layers, 1, rt.config.n_kv_heads, 1, rt.config.head_dim))
        self.scratch_v = torch.zeros_like(self.scratch_k)
        rng = np.random.default_rng(5)
        self.table = torch.from_numpy((rng.standard_normal((rt.config.vocab_size, rt.config.vocab_size)) * 4)
                                      .astype(np.float32))

    def plan(self, slots):
        return None

    def fits(self, steps):
        return True

    def requests(self, steps):
        from codecomplete.models.varlen_triton import VarlenRequest

        return [VarlenRequest(s.context.kv[0], s.context.kv[1], len(s.context.tokens), s.branches.kv[0],
                              s.branches.kv[1], s.branches.step, s.next_tokens) for s in steps]

    def step(self, meta, plan, cmeta=None):
        return self.table[meta[self.token_field]]


@torch.inference_mode()  # as the runtime's decode calls run (the captured buffers are inference tensors)
def test_graphs_reduce_their_rows_in_the_replay_as_the_host_would(tiny_model_dir):
    """DecodeGraphs captured with top_k reduce each replay's rows inside it (replays
    emulated on CPU): the same TopRows as reducing the same logits after the step, with the
    banned mask switched between steps (banned ids, none, others), and whole rows kept."""
    from codecomplete.runtime.torch_graphs import DecodeGraphs, TopSpec

    rt = load_runtime(str(tiny_model_dir), runtime="torch")
    fake = _TableStep(rt)
    graphs = DecodeGraphs(fake, 8, emulate=True, top_k=TOP_K, tail=TAIL)
    graphs.capture_all()
    assert graphs.reduces(TopSpec(None, TOP_K, TAIL, torch.float32))
    assert not graphs.reduces(TopSpec(None, TOP_K // 2, TAIL, torch.float32))
    state, _ = rt.prefill([1, 2, 3, 4])
    other, _ = rt.prefill([5, 6])
    vocab = rt.config.vocab_size
    bans = [np.array([int(fake.table[7].argmax()), 3]), None, np.array([11, 12, 13])]
    rng = np.random.default_rng(1)
    for banned in bans * 2:
        steps = [DecodeStep(state, rt.start_branches(state, 3, 4), rng.integers(0, vocab, 3).tolist()),
                 DecodeStep(other, rt.start_branches(other, 2, 4), [7, int(rng.integers(0, vocab))])]
        mask = rt._banned_mask(banned)
        out = graphs.run(steps, top=TopSpec(mask, TOP_K, TAIL, torch.float32))
        logits = fake.table[torch.tensor([t for s in steps for t in s.next_tokens])]
        ref = reduce_rows(logits, steps, mask, TOP_K, TAIL, torch.float32)
        for got, want in zip(out, ref, strict=True):
            assert isinstance(got, TopRows)
            assert np.array_equal(got.ids, want.ids) and np.array_equal(got.values, want.values)
            assert np.allclose(got.lse, want.lse, atol=1e-6)
            assert np.array_equal(got.full(), want.full())
        if banned is not None:  # the banned ids are never among a row's best
            assert not np.isin(out[0].ids, banned).any()
        else:
            assert out[1].ids[0].tolist().count(int(fake.table[7].argmax())) == 1
    # only buckets of at most top_max_rows rows reduce in their replay; larger ones after it
    mixed = DecodeGraphs(fake, 8, emulate=True, top_k=TOP_K, tail=TAIL, top_max_rows=2)
    mixed.capture_all()
    assert {slots: cap.packed_dev is not None for (slots, _), cap in mixed.captured.items()} == \
        {slots: slots <= 2 for (slots, _) in mixed.captured}
    for rows in (2, 5):
        steps = [DecodeStep(state, rt.start_branches(state, rows, 4), rng.integers(0, vocab, rows).tolist())]
        mask = rt._banned_mask(bans[0])
        got = mixed.run(steps, top=TopSpec(mask, TOP_K, TAIL, torch.float32))[0]
        want = reduce_rows(fake.table[torch.tensor(steps[0].next_tokens)], steps, mask, TOP_K, TAIL, torch.float32)[0]
        assert np.array_equal(got.ids, want.ids) and np.array_equal(got.values, want.values)
        assert np.allclose(got.lse, want.lse, atol=1e-6)
    eager = DecodeGraphs(fake, 8, emulate=True)  # captured without the reduction: reduced after the replay
    eager.capture_all()
    steps = [DecodeStep(state, rt.start_branches(state, 3, 4), [1, 2, 3])]
    got = eager.run(steps, top=TopSpec(None, TOP_K, TAIL, torch.float32))[0]
    want = reduce_rows(fake.table[torch.tensor([1, 2, 3])], steps, None, TOP_K, TAIL, torch.float32)[0]
    assert np.array_equal(got.ids, want.ids) and np.array_equal(got.values, want.values)


def test_a_typed_keystroke_starts_its_loop_from_the_extensions_reduced_rows(tiny_model_dir):
    """With batching on a runtime that reduces rows, a keystroke's typed token rides the
    decode batch and comes back reduced (TopRows, under the batch's bans): its loop picks
    its first tokens from those with the others' (pick_many), the same answers, keystroke by
    keystroke, as an engine without batching on whole rows. Exact mode (every keystroke
    decodes; the benchmarks') and the default."""
    import threading

    from codecomplete.batching import BatchScheduler

    def typing(user: int) -> list[CompletionRequest]:
        text = DOCUMENTS[user]
        start = text.index("return") + 2
        return [CompletionRequest(text=text[:o] + text[start + 10:], offset=o, language="python",
                                  path=f"u{user}.py", options=CompletionOptions(n=3, max_new_tokens=6,
                                                                                deadline_ms=60_000, seed=user))
                for o in range(start, start + 10)]

    for exact in (4, None):
        alone = {}
        for user in (0, 1):
            engine = Engine(load_runtime(str(tiny_model_dir), runtime="torch"))
            engine.exact_new_tokens, engine.reuse_keystrokes = exact, exact is None
            alone[user] = [(_answer(c), c.tokens_generated) for c in map(engine.complete, typing(user))]
        rt = load_runtime(str(tiny_model_dir), runtime="torch")
        rt.reduces_rows = True
        reduced_firsts = []
        extended = BatchScheduler._extended

        def counting(self, job, logits, extended=extended, seen=reduced_firsts):
            seen.append(isinstance(logits, TopRows))
            return extended(self, job, logits)

        BatchScheduler._extended = counting
        whole_rows = []  # a loop started from reduced rows banned under other ids reads the whole row
        real_full = TopRows.full

        def full(self, real_full=real_full, seen=whole_rows):
            seen.append(len(self))
            return real_full(self)

        TopRows.full = full
        batched, engine = {}, Engine(rt, batching="on", rerank_workers=0)
        engine.exact_new_tokens, engine.reuse_keystrokes = exact, exact is None
        try:
            def user_types(user: int, out=batched, engine=engine) -> None:
                out[user] = [(_answer(c), c.tokens_generated) for c in map(engine.complete, typing(user))]

            threads = [threading.Thread(target=user_types, args=(u,)) for u in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            BatchScheduler._extended, TopRows.full = extended, real_full
            engine.close()
        assert batched == alone and not whole_rows
        if exact:  # each keystroke's typed (or recomputed) token came back reduced
            assert sum(reduced_firsts) >= 10
