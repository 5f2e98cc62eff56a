"""The batch scheduler behind Engine(batching="on"): concurrent requests decode together
and answer exactly what each would alone; cancellation, deadlines, errors and shutdown stay
per request; a chunked prefill equals a whole one."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from codecomplete.alignment import back_off_tokens  # noqa: E402
from codecomplete.batching import BatchScheduler, PrefillStopped, SchedulerClosed  # noqa: E402
from codecomplete.engine import Engine  # noqa: E402
from codecomplete.models.testing import SAMPLE_CODE  # noqa: E402
from codecomplete.request import CompletionOptions, CompletionRequest, StopReason  # noqa: E402
from codecomplete.runtime import Runtime, load_runtime  # noqa: E402

CHUNK_TOKENS = 24  # small, so that the test prompts are prefilled in several chunks
DOCUMENTS = [SAMPLE_CODE, SAMPLE_CODE[200:] + SAMPLE_CODE, "def f(x):\n    return x + 1\n\n" * 6 + SAMPLE_CODE[:300]]
class _Fusing:
    """The CPU runtime in the part of one that fuses prefill chunks into its decode step
    (Runtime.fused_chunk_tokens, the CUDA graphs): decode_many(chunk=) prefills the chunk
    with the step (as a plain prefill here) and records each chunk's new tokens."""

    fused_chunk_tokens = 16

    def __init__(self, rt: Runtime):
        self._rt, self.chunks = rt, []

    def __getattr__(self, name):
        return getattr(self._rt, name)

    def _ride(self, chunk) -> None:
        chunk.state, chunk.logits = self._rt.prefill(chunk.tokens, chunk.previous,
                                                     capacity_tokens=chunk.capacity_tokens)
        chunk.fused = True
        self.chunks.append(chunk.state.new_tokens)

    def decode_many(self, steps, chunk=None):
        if chunk is not None:
            self._ride(chunk)
        return self._rt.decode_many(steps)

    def decode_many_top(self, steps, full, banned, k, tail, chunk=None):
        if chunk is not None:
            self._ride(chunk)
        return self._rt.decode_many_top(steps, full, banned, k, tail)


def _runtime(model_dir, kind: str) -> Runtime:
    """A torch runtime whose decode_many is the base class's per-request loop ("fallback"),
    one batched pass ("batched"), or that with prefill chunks riding the steps ("fused")."""
    rt = load_runtime(str(model_dir), runtime="torch")
    if kind == "fallback":
        rt.decode_many = lambda steps: Runtime.decode_many(rt, steps)
    return _Fusing(rt) if kind == "fused" else rt


def _request(doc: int, offset: int, path: str | None = None, **options) -> CompletionRequest:
    opts = CompletionOptions(**{"n": 3, "max_new_tokens": 8, "deadline_ms": 60_000, **options})
    text = DOCUMENTS[doc]
    return CompletionRequest(text=text, offset=min(offset, len(text)), language="python",
                             path=path or f"doc{doc}-{offset}.py", options=opts)


def _prompt_tokens(rt: Runtime, request: CompletionRequest) -> list[int]:
    """The prompt the engine builds for a request (one-line scope or max_new_tokens <= 48)."""
    opts = request.options
    return Engine(rt).prompts.build(request, opts.max_new_tokens + back_off_tokens(opts)).tokens


def _answer(completion) -> list[tuple[str, str, float]]:
    return [(c.text, c.stop_reason, round(c.logprob, 4)) for c in completion.candidates]


def _alone(rt: Runtime, request: CompletionRequest):
    """The request on a fresh engine without batching (nothing kept from other requests)."""
    return Engine(rt).complete(request)


def _together(engine: Engine, requests: list[CompletionRequest], delays_s: list[float]) -> list:
    """All requests from their own threads, each starting after its delay."""
    out: list = [None] * len(requests)

    def one(i: int) -> None:
        time.sleep(delays_s[i])
        try:
            out[i] = engine.complete(requests[i])
        except Exception as e:  # kept: the test checks it
            out[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


@pytest.mark.parametrize("decode_many", ["fallback", "batched", "fused"])
@pytest.mark.parametrize("seed", [0, 1])
def test_batched_answers_equal_each_request_alone(tiny_model_dir, decode_many, seed):
    rng = random.Random(seed)
    requests = []
    for i in range(6):
        doc = rng.randrange(len(DOCUMENTS))
        requests.append(_request(doc, rng.randrange(20, len(DOCUMENTS[doc])), path=f"user{i}/doc{doc}.py",
                                 n=rng.choice([1, 2, 4]), max_new_tokens=rng.choice([2, 5, 12]),
                                 multiline=rng.choice([None, True, False]), seed=rng.randrange(100),
                                 patience_steps=rng.choice([None, 2])))
    delays = [rng.uniform(0.0, 0.05) for _ in requests]
    reference = _runtime(tiny_model_dir, "fallback")
    alone = [_alone(reference, r) for r in requests]
    engine = Engine(_runtime(tiny_model_dir, decode_many), batching="on", prefill_chunk_tokens=CHUNK_TOKENS)
    try:
        together = _together(engine, requests, delays)
        records = engine.scheduler.stats.decode_records()
    finally:
        engine.close()
    for a, b in zip(alone, together, strict=True):
        assert not isinstance(b, Exception), b
        assert _answer(b) == _answer(a)
        assert b.tokens_generated == a.tokens_generated
        assert b.prefill_new_tokens == a.prefill_new_tokens and b.prefill_reused_tokens == 0
    if decode_many != "fused":  # (fused: a newcomer joins later, its prompt a chunk a step)
        assert max(len(r.rows) for r in records) >= 2  # some steps did decode several requests at once
    assert sum(r.prefill_calls for r in engine.scheduler.stats.records) > len(requests)  # chunked
    if decode_many == "fused":  # while requests decoded, the newcomers' chunks rode their steps
        rt = engine.runtime
        assert rt.chunks and max(rt.chunks) <= rt.fused_chunk_tokens
        assert sum(r.fused_tokens for r in records) == sum(rt.chunks)
        assert all(r.prefill_ms == 0 for r in records)  # no chunk between two steps


def test_cancelling_one_request_mid_decode_leaves_the_others_unchanged(tiny_model_dir):
    requests = [_request(i % 3, 150 + 40 * i, n=3, max_new_tokens=16, multiline=True) for i in range(4)]
    reference = _runtime(tiny_model_dir, "fallback")
    alone = [_alone(reference, r) for r in requests]
    rt = _runtime(tiny_model_dir, "batched")
    batched = rt.decode_many
    victim = requests[1]
    seen = {"steps": 0}

    def cancel_midway(steps):
        out = batched(steps)
        if any(len(s.context.tokens) == seen.get("victim_len") for s in steps):
            seen["steps"] += 1
            if seen["steps"] == 3:
                victim.cancel.cancel()
        return out

    rt.decode_many = cancel_midway
    seen["victim_len"] = len(_prompt_tokens(reference, victim))
    engine = Engine(rt, batching="on", prefill_chunk_tokens=CHUNK_TOKENS)
    try:
        together = _together(engine, requests, [0.0] * 4)
    finally:
        engine.close()
    assert together[1].cancelled and victim.cancel.cancelled
    assert together[1].tokens_generated < alone[1].tokens_generated
    for i in (0, 2, 3):
        assert not together[i].cancelled
        assert _answer(together[i]) == _answer(alone[i])


def test_chunked_prefill_equals_a_whole_one(tiny_model_dir):
    rt = _runtime(tiny_model_dir, "fallback")
    tokens = rt.tokenizer.encode(SAMPLE_CODE)[:130]
    whole, whole_logits = rt.prefill(tokens)
    scheduler = BatchScheduler(rt, prefill_chunk_tokens=32)
    try:
        with scheduler.session() as session:
            chunked, chunked_logits = session.prefill(tokens)
            calls = [r.prefill_calls for r in scheduler.stats.records if r.prefill_calls]
            np.testing.assert_allclose(chunked_logits, whole_logits, atol=1e-4)
            assert (chunked.reused_tokens, chunked.new_tokens) == (0, len(tokens))
            assert len(tokens) > 96 and len(calls) == -(-len(tokens) // 32)  # one 32-token chunk per iteration
            greedy = []
            for state, logits, rt_ in ((whole, whole_logits, rt), (chunked, chunked_logits, session)):
                branches = rt_.start_branches(state, 1, 8)
                token, path = int(np.argmax(logits)), []
                for _ in range(8):
                    path.append(token)
                    token = int(np.argmax(rt_.decode(state, branches, [token])[0]))
                greedy.append(path)
            assert greedy[0] == greedy[1]
    finally:
        scheduler.close()


@pytest.mark.parametrize("case", ["appended", "rewritten", "unchanged"])
def test_a_prompt_differing_in_its_last_tokens_rides_the_decode_batch(tiny_model_dir, case):
    """Typing at the end of the prompt appends tokens; a backspace or a moved back-off
    rewrites the last ones; an unchanged prompt computes its last token again for its
    logits. Each is a few tokens over the previous state's prefix, decoded through the batch
    one a step, not a prefill call (a chunk would cost a whole chunk's pass where chunks
    ride the step), and its state is a fresh prefill's."""
    rt = _runtime(tiny_model_dir, "fallback")
    tokens = rt.tokenizer.encode(SAMPLE_CODE)[:90]
    first, typed = {"appended": (tokens[:87], tokens), "rewritten": (tokens[:88], tokens[:86] + [tokens[88], tokens[87]]),
                    "unchanged": (tokens[:88], tokens[:88])}[case]
    new = {"appended": 3, "rewritten": 2, "unchanged": 1}[case]
    _, whole_logits = rt.prefill(typed)
    scheduler = BatchScheduler(rt, prefill_chunk_tokens=64)
    try:
        with scheduler.session() as session:
            previous, _ = session.prefill(first)
            prefill_calls = sum(r.prefill_calls for r in scheduler.stats.records)
            state, logits = session.prefill(typed, previous)
        assert sum(r.prefill_calls for r in scheduler.stats.records) == prefill_calls  # no prefill call
        assert [r.rows for r in scheduler.stats.decode_records()] == [(1,)] * new  # one token a step
        assert (state.tokens, state.reused_tokens, state.new_tokens, state.adopted_tokens) == (
            typed, len(typed) - new, new, 0)
        np.testing.assert_allclose(logits, whole_logits, atol=1e-4)
        # the state's KV is the whole prompt's: decoding over it gives what a fresh prefill does
        fresh, _ = rt.prefill(typed)
        branches = [rt.start_branches(s, 1, 2) for s in (state, fresh)]
        np.testing.assert_allclose(rt.decode(state, branches[0], [tokens[0]]), rt.decode(fresh, branches[1], [tokens[0]]),
                                   atol=1e-4)
    finally:
        scheduler.close()


def test_each_request_keeps_its_own_deadline(tiny_model_dir):
    rt = _runtime(tiny_model_dir, "batched")
    batched = rt.decode_many

    def slow(steps):  # a slow model: 40 decode steps take far longer than the short deadline
        time.sleep(0.01)
        return batched(steps)

    rt.decode_many = slow
    hurried = _request(0, 300, n=2, max_new_tokens=40, multiline=True, deadline_ms=150)
    patient = [_request(1, 260 + 30 * i, n=2, max_new_tokens=40, multiline=True) for i in range(2)]
    reference = _runtime(tiny_model_dir, "fallback")
    alone = [_alone(reference, r) for r in patient]
    engine = Engine(rt, batching="on", prefill_chunk_tokens=CHUNK_TOKENS)
    try:
        t0 = time.monotonic()
        out = _together(engine, [hurried, *patient], [0.0] * 3)
    finally:
        engine.close()
    assert out[0].timings_ms["total"] < 150 + 60  # one slow step past the deadline at most
    assert out[0].tokens_generated < 2 * 40
    assert time.monotonic() - t0 > 0.3  # the others went on decoding
    for got, want in zip(out[1:], alone, strict=True):
        assert _answer(got) == _answer(want)


def test_a_failing_request_leaves_the_scheduler_and_its_partners_running(tiny_model_dir):
    rt = _runtime(tiny_model_dir, "batched")
    real_prefill = rt.prefill
    bad = _request(0, 77, path="bad.py", n=2, max_new_tokens=6)
    poison = _prompt_tokens(rt, bad)

    def prefill(tokens, previous=None, **kwargs):
        if list(tokens) == poison:
            raise ValueError("this prompt upsets the model")
        return real_prefill(tokens, previous, **kwargs)

    rt.prefill = prefill
    good = [_request(2, 100 + 50 * i, n=2, max_new_tokens=6) for i in range(3)]
    engine = Engine(rt, batching="on", prefill_chunk_tokens=CHUNK_TOKENS)
    try:
        out = _together(engine, [bad, *good], [0.0] * 4)
        with engine.scheduler.session() as session:  # a malformed step fails alone, in its own thread
            state, _ = session.prefill([5, 6, 7])
            branches = session.start_branches(state, 2, 4)
            with pytest.raises(ValueError, match="tokens for 2 branches"):
                session.decode(state, branches, [1, 2, 3])
        later = engine.complete(_request(0, 120, n=2, max_new_tokens=6))
        assert engine.scheduler.alive
    finally:
        engine.close()
    assert isinstance(out[0], ValueError)
    reference = _runtime(tiny_model_dir, "fallback")
    for got, request in zip(out[1:], good, strict=True):
        assert _answer(got) == _answer(_alone(reference, request))
    assert later.candidates or later.tokens_generated


def test_close_joins_the_thread_and_later_calls_get_a_clear_error(tiny_model_dir):
    engine = Engine(_runtime(tiny_model_dir, "fallback"), batching="on")
    thread = engine.scheduler._thread
    engine.complete(_request(0, 100))
    engine.close()
    assert not thread.is_alive()
    with pytest.raises(SchedulerClosed):
        engine.complete(_request(1, 100))


def test_requests_for_one_document_take_turns(tiny_model_dir):
    engine = Engine(_runtime(tiny_model_dir, "batched"), batching="on", prefill_chunk_tokens=CHUNK_TOKENS)
    same = [_request(0, 300, path="shared.py", max_new_tokens=4), _request(0, 301, path="shared.py", max_new_tokens=4)]
    try:
        first, second = _together(engine, same, [0.0, 0.0])
    finally:
        engine.close()
    # whichever ran second found the other's KV state kept for the document: they did not overlap
    assert max(first.prefill_reused_tokens, second.prefill_reused_tokens) > 0 or first.cached or second.cached


def test_a_cancelled_prefill_stops_at_a_chunk_and_keeps_what_it_computed(tiny_model_dir):
    rt = _runtime(tiny_model_dir, "fallback")
    real_prefill = rt.prefill
    request = _request(1, len(DOCUMENTS[1]) - 5, path="long.py")
    assert len(_prompt_tokens(rt, request)) > 3 * CHUNK_TOKENS

    def prefill(tokens, previous=None, **kwargs):
        if len(tokens) >= 2 * CHUNK_TOKENS:  # the second chunk done: the user typed on
            request.cancel.cancel()
        return real_prefill(tokens, previous, **kwargs)

    rt.prefill = prefill
    engine = Engine(rt, batching="on", prefill_chunk_tokens=CHUNK_TOKENS)
    try:
        stopped = engine.complete(request)
        retry = engine.complete(_request(1, len(DOCUMENTS[1]) - 5, path="long.py"))
    finally:
        engine.close()
    assert stopped.cancelled and not stopped.candidates and stopped.tokens_generated == 0
    assert retry.prefill_reused_tokens == 2 * CHUNK_TOKENS  # the next request went on from there


def test_without_batching_concurrent_callers_take_turns(tiny_model_dir):
    rt = _runtime(tiny_model_dir, "fallback")
    inside, most = [0], [0]
    real_decode = rt.decode

    def decode(*args):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.001)
        inside[0] -= 1
        return real_decode(*args)

    rt.decode = decode
    engine = Engine(rt)
    out = _together(engine, [_request(i % 3, 100 + 20 * i) for i in range(4)], [0.0] * 4)
    assert all(not isinstance(c, Exception) for c in out) and most[0] == 1
    assert engine.scheduler is None


def test_unknown_batching_is_a_clear_error(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown batching"):
        Engine(_runtime(tiny_model_dir, "fallback"), batching="sometimes")


def test_exact_new_tokens_decodes_the_same_length_every_time(tiny_model_dir):
    engine = Engine(_runtime(tiny_model_dir, "fallback"))
    engine.exact_new_tokens = 7
    for offset in (60, 200, 330):
        c = engine.complete(_request(0, offset, n=3, max_new_tokens=2, multiline=False, deadline_ms=1))
        assert c.tokens_generated == 3 * 7
        assert all(cand.stop_reason == StopReason.MAX_TOKENS for cand in c.candidates)
    # the user types what a candidate begins with: still a model run, not the typing cache
    shown = next(cand.text for cand in c.candidates if len(cand.text) > 1)
    text = DOCUMENTS[0][:330] + shown[0] + DOCUMENTS[0][330:]
    typed = engine.complete(CompletionRequest(text=text, offset=331, language="python", path="doc0-330.py",
                                              options=CompletionOptions(n=3, max_new_tokens=2, multiline=False)))
    assert not typed.cached and typed.tokens_generated == 3 * 7


def test_a_stopped_prefill_is_an_exception_with_its_part():
    e = PrefillStopped(None, None)
    assert e.state is None and "stopped" in str(e)


def test_the_documents_whose_prompt_kv_is_kept(tiny_model_dir):
    rt = _runtime(tiny_model_dir, "fallback")
    laptop = Engine(rt).contexts  # two entries, which a new document may take over
    assert (laptop.size, laptop.others_when_full) == (2, False)
    replica = Engine(rt, cached_documents=16).contexts  # a server's typists keep their own
    assert (replica.size, replica.others_when_full) == (16, True)
    batched = Engine(rt, batching="on")
    try:
        assert batched.contexts.others_when_full and batched.contexts.size > 16
    finally:
        batched.close()


def test_requests_arriving_together_in_exact_mode_ban_one_array(tiny_model_dir, monkeypatch):
    """The benchmarks' exact mode bans the stop ids too, in one array made on first use: the
    scheduler reduces a batch's rows for the banned array of its first loop, and a loop
    banning another object (even an equal one) gets whole rows every step. Requests that
    arrive together must not each make their own."""
    import codecomplete.engine as engine_module

    union, made = np.union1d, []

    def slow_union(a, b):  # widens the window in which a second request could make its own
        time.sleep(0.05)
        made.append(union(a, b))
        return made[-1]

    seen = []
    real_sampler = engine_module.Sampler

    def sampler(**kwargs):
        seen.append(kwargs["banned"])
        return real_sampler(**kwargs)

    monkeypatch.setattr(engine_module.np, "union1d", slow_union)
    monkeypatch.setattr(engine_module, "Sampler", sampler)
    engine = Engine(_runtime(tiny_model_dir, "batched"), batching="on", rerank_workers=0)
    engine.exact_new_tokens = 4
    try:
        out = _together(engine, [_request(d, 300, path=f"p{d}.py") for d in range(3)], [0.0, 0.0, 0.0])
    finally:
        engine.close()
    assert not any(isinstance(o, Exception) for o in out)
    assert len(made) == 1 and len(seen) == 3 and all(b is seen[0] for b in seen)
