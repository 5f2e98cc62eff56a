"""The engine end to end on a tiny random model: alignment, caches, cancellation, limits."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytest.importorskip("torch")

from codecomplete.alignment import VocabTrie, back_off  # noqa: E402
from codecomplete.engine import Engine  # noqa: E402
from codecomplete.request import CancelToken, CompletionOptions, CompletionRequest  # noqa: E402
from codecomplete.sampling import generate  # noqa: E402

SOURCE = '''import os


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y


def print_values(values):
    for value in values:
        print(value)
'''


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.load(str(tiny_model_dir), runtime="torch")


def _request(text, offset, **opts):
    options = CompletionOptions(**{"n": 3, "max_new_tokens": 8, "deadline_ms": 60_000, **opts})
    return CompletionRequest(text=text, offset=offset, language="python", path="demo.py", options=options)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(min_value=1, max_value=len(SOURCE)), seed=st.integers(0, 1000))
def test_generated_text_always_agrees_with_the_backed_off_text(engine, offset, seed):
    rt = engine.runtime
    prefix_tokens = rt.tokenizer.encode(SOURCE[:offset])
    bo = back_off(prefix_tokens, rt.tokenizer.token_bytes, 3, engine.prompts.special_ids)
    state, logits = rt.prefill(bo.kept or [0])
    result = generate(rt, state, logits, n=3, max_new_tokens=6, constraint=bo.removed,
                      trie=VocabTrie(rt.tokenizer.token_bytes), stop_ids=set(), stop_fn=lambda b: None,
                      seed=seed)
    for b in result.branches:
        data = bytes(b.data)
        assert data.startswith(bo.removed) or bo.removed.startswith(data)


def test_patience_stops_the_samples_soon_after_the_greedy_candidate_ends(engine):
    import numpy as np

    rt = engine.runtime
    state, logits = rt.prefill(rt.tokenizer.encode(SOURCE))
    greedy_first = int(np.argmax(logits))  # a stop token for the greedy branch only
    runs = {patience: generate(rt, state, logits, n=4, max_new_tokens=8, constraint=b"", trie=None,
                               stop_ids={greedy_first}, stop_fn=lambda b: None, temperature=2.0,
                               patience=patience)
            for patience in (None, 1)}
    assert runs[1].branches[0].stop_reason == "eos" and runs[1].steps <= 2
    assert {b.stop_reason for b in runs[1].branches[1:]} <= {"patience", "eos"}
    assert runs[None].steps == 7 and {b.stop_reason for b in runs[None].branches[1:]} == {"max_tokens"}


def test_mid_token_completion_is_inserted_after_the_typed_text(engine):
    text = SOURCE + "        pri"
    completion = engine.complete(_request(text, len(text), n=4, max_new_tokens=16))
    assert completion.timings_ms["total"] > 0
    assert completion.candidates, "the tiny model gave no candidate for this prompt"
    for c in completion.candidates:
        assert "\n" not in c.text  # mid-line: the rest of the line only
    texts = [c.text for c in completion.candidates]
    assert len(set(texts)) == len(texts)  # the engine's post-processing dedupes


def test_second_keystroke_reuses_the_prompt_kv(engine):
    text = SOURCE + "    x = Po"
    engine.complete(_request(text, len(text), seed=1))
    engine.suggestions.clear()  # a shown candidate starting with "i" would answer from the typing cache
    text2 = text + "i"
    completion = engine.complete(_request(text2, len(text2), seed=1))
    assert completion.prefill_reused_tokens > 0
    assert completion.prefill_new_tokens < completion.prefill_reused_tokens


def test_typing_the_start_of_a_shown_candidate_is_answered_from_cache(engine):
    text = SOURCE + "    y = "
    for seed in range(2, 12):  # a seed whose answer holds a candidate of two characters or more
        engine.forget()
        first = engine.complete(_request(text, len(text), seed=seed))
        shown = next((c.text for c in first.candidates if len(c.text) >= 2), None)
        if shown is not None:
            break
    assert shown is not None, "ten seeds gave no candidate of two characters"
    typed = text + shown[0]
    second = engine.complete(_request(typed, len(typed), seed=seed))
    assert second.cached and second.model_calls == 0
    assert shown[1:] in [c.text for c in second.candidates]


def test_cancelled_request_stops_without_decoding(engine):
    token = CancelToken()
    token.cancel()
    text = SOURCE + "    z = "
    req = _request(text, len(text), max_new_tokens=32)
    req.cancel = token
    completion = engine.complete(req)
    assert completion.cancelled
    assert completion.model_calls == 1  # the prefill only


def test_cursor_outside_the_document_is_a_clear_error(engine):
    with pytest.raises(ValueError, match="outside the document"):
        engine.complete(_request("abc", 10))


def test_zero_deadline_still_answers_quickly(engine):
    text = SOURCE + "    w = "
    completion = engine.complete(_request(text, len(text), deadline_ms=0, max_new_tokens=48))
    assert completion.model_calls <= 2


def test_without_alignment_the_prompt_keeps_every_prefix_token(engine):
    text = SOURCE + "    print_v"
    req = _request(text, len(text), align=False)
    prompt = engine.prompts.build(req, 8)
    assert prompt.back_off.removed == b""
    req_aligned = _request(text, len(text))
    assert engine.prompts.build(req_aligned, 8).back_off.removed_tokens > 0


def test_an_unchanged_prompt_reuses_the_kept_logits_without_a_model_call(engine, monkeypatch):
    # typing inside a word that the back-off removes leaves the prompt as it was
    text = SOURCE + "    print_val"
    typed = text + "u"
    prompt = engine.prompts.build(_request(text, len(text), back_off_needed=True), 8).tokens
    assert engine.prompts.build(_request(typed, len(typed), back_off_needed=True), 8).tokens == prompt
    first = engine.complete(_request(text, len(text), seed=4, back_off_needed=True))
    engine.suggestions.clear()  # no answer from the typing cache
    prefills = []
    real_prefill = engine.runtime.prefill
    monkeypatch.setattr(engine.runtime, "prefill", lambda *a: prefills.append(a) or real_prefill(*a))
    second = engine.complete(_request(typed, len(typed), seed=4, back_off_needed=True))
    assert first.prefill_new_tokens > 0
    assert not prefills and second.prefill_new_tokens == 0 and second.prefill_reused_tokens == len(prompt)
    assert all(c.text for c in second.candidates)
    # the kept logits are the prompt's own: a fresh prefill of the same tokens gives them
    kept = engine.contexts.take("demo.py", prompt)
    assert kept.tokens == prompt
    assert abs(kept.logits - real_prefill(prompt)[1]).max() < 1e-3


def test_typing_what_a_branch_began_with_adopts_its_kv_without_a_prefill(engine, monkeypatch):
    """The user types text a candidate branch was fed (a shown candidate's start, or one that
    was cut): the new prompt goes on along that branch, so its KV and logits are reused."""
    text = SOURCE + "    total = "
    opts = dict(seed=5, align=False, n=4, max_new_tokens=6)
    engine.forget()
    engine.complete(_request(text, len(text), **opts))
    previous = engine.contexts._states["demo.py"]
    tok = engine.runtime.tokenizer
    # find a path of fed tokens whose text, typed, makes exactly that prompt
    typed = None
    for k, step in enumerate(previous.trace.steps, start=1):
        for path in step.rows:
            candidate = text + tok.decode(list(path))
            prompt = engine.prompts.build(_request(candidate, len(candidate), **opts), 6).tokens
            if prompt == previous.tokens + list(path):
                typed, adopted = candidate, k
                break
        if typed:
            break
    assert typed is not None, "no decoded path re-tokenizes to itself"
    engine.suggestions.clear()  # not the typing cache: the model runs, but without a prefill
    prefills = []
    real_prefill = engine.runtime.prefill
    monkeypatch.setattr(engine.runtime, "prefill", lambda *a: prefills.append(a) or real_prefill(*a))
    second = engine.complete(_request(typed, len(typed), **opts))
    assert not prefills
    assert second.prefill_adopted_tokens == adopted and second.prefill_new_tokens == 0
    assert second.source == "warm" and second.model_calls >= 1


def test_a_repeated_request_takes_every_step_from_the_last_trace(engine):
    # the same prompt and seed walk the same paths: no prefill and no decode call, same answer
    text = SOURCE + "    count = "
    engine.forget()
    first = engine.complete(_request(text, len(text), seed=6))
    engine.suggestions.clear()
    second = engine.complete(_request(text, len(text), seed=6))
    assert first.model_calls > 1 and second.model_calls == 0 and not second.cached
    assert [c.text for c in second.candidates] == [c.text for c in first.candidates]
    engine.reuse_keystrokes = False  # measurement switch: every keystroke computes again
    try:
        engine.suggestions.clear()
        third = engine.complete(_request(text, len(text), seed=6))
        assert third.model_calls == first.model_calls
    finally:
        engine.reuse_keystrokes = True


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(st.tuples(st.sampled_from(["type", "delete", "cancel", "candidates", "repeat"]),
                                  st.sampled_from(list("ab_ (.:=\n") + ["print", "self."])), min_size=1, max_size=12))
@example(actions=[("type", "print"), ("repeat", "a"), ("cancel", "a"), ("repeat", "a"), ("candidates", "a")])
def test_typing_with_cancels_and_setting_changes_reuses_only_what_fits(engine, actions):
    """Whatever the keystrokes, cancellations and option changes, reuse of the last
    keystroke's work never fails, and a repeated request after a full answer decodes nothing."""
    engine.forget()
    text, n, last = SOURCE + "    ", 3, None
    for action, arg in actions:
        if action == "type":
            text += arg
        elif action == "delete":
            text = text[:-1] if len(text) > len(SOURCE) else text
        elif action == "candidates":
            n = 1 + (n % 4)
        req = _request(text, len(text), n=n, seed=7)
        if action == "cancel":
            req.cancel.cancel()
        engine.suggestions.clear()  # the model runs on every request
        completion = engine.complete(req)
        texts = [c.text for c in completion.candidates]
        assert completion.cancelled == (action == "cancel")
        # a prefill, then at most one decode call per token (8 asked for, 3 backed off)
        assert completion.model_calls <= (1 if action == "cancel" else 1 + 8 + 3)
        assert len(texts) <= n and all(t.strip() for t in texts) and len(set(texts)) == len(texts)
        if action == "repeat" and last is not None and last[0] == (text, n) and not last[1].cancelled \
                and all(c.stop_reason in ("stop", "eos", "max_tokens", "patience") for c in last[1].candidates):
            assert completion.model_calls == 0
            assert [c.text for c in completion.candidates] == [c.text for c in last[1].candidates]
        last = ((text, n), completion)


def test_a_deadline_stamped_on_arrival_is_kept_and_a_passed_one_stops_the_decode(engine):
    import time

    text = SOURCE + "    v = "
    unstamped = _request(text, len(text), max_new_tokens=16)
    engine.forget()
    engine.complete(unstamped)
    assert unstamped.deadline is None and unstamped.options.deadline_ms == 60_000  # the caller's request as it was
    late = _request(text, len(text), max_new_tokens=16)
    late.deadline = time.monotonic() - 1.0  # arrived, then waited past its deadline
    engine.forget()
    completion = engine.complete(late)
    assert completion.model_calls == 1  # the prefill, then one token each and the deadline
    assert all(c.stop_reason == "deadline" for c in completion.candidates)


def test_the_engine_windows_a_long_document_as_the_server_used_to(engine):
    from codecomplete.text import text_window

    filler = "".join(f"value_{i} = {i}\n" for i in range(12_000))  # ~200k characters
    text = filler + SOURCE + "    u = "
    window, offset = text_window(text, len(text))
    assert len(window) < len(text)
    engine.forget()
    whole = engine.complete(_request(text, len(text), seed=3))
    engine.forget()
    cut = engine.complete(_request(window, offset, seed=3))
    assert [c.text for c in whole.candidates] == [c.text for c in cut.candidates]
    assert whole.prefill_new_tokens == cut.prefill_new_tokens


def test_an_engine_leaves_its_objects_out_of_later_full_collections(tiny_model_dir):
    """A full collection walks every tracked object, and every request waits meanwhile: an
    engine once built moves what is alive (tokenizer tables, vocabulary trie) into the
    permanent generation, so later collections skip it."""
    import gc

    from codecomplete.bench.common import GcPauses
    from codecomplete.runtime import load_runtime

    before = gc.get_freeze_count()
    engine = Engine(load_runtime(str(tiny_model_dir), runtime="torch"))
    assert gc.get_freeze_count() > before
    assert all(o is not engine.trie for o in gc.get_objects(generation=2))  # frozen: in no generation
    with GcPauses() as pauses:
        gc.collect()
    figures = pauses.figures()
    assert figures["count"] >= 1 and figures["full"] >= 1 and figures["max_ms"] >= 0
    engine.close()  # an engine closed gives them back: dropped, it is collected whole
    assert gc.get_freeze_count() == 0
