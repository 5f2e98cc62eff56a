"""Prompt windows while typing: what the builder remembers between keystrokes changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codecomplete.models.format.folder import open_model_folder
from codecomplete.models.format.tokenizer import Tokenizer
from codecomplete.prompt import PromptBuilder
from codecomplete.request import CompletionOptions, CompletionRequest

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "codecomplete" / "engine.py").read_text(encoding="utf-8")
OPTS = CompletionOptions(prefix_tokens=300, suffix_tokens=100)


@pytest.fixture(scope="module")
def shipped():
    folder = ROOT / "models" / "default"
    return Tokenizer.from_file(folder / "tokenizer.json"), open_model_folder(folder).config


def _request(text: str, offset: int) -> CompletionRequest:
    return CompletionRequest(text=text, offset=offset, language="python", path="engine.py", options=OPTS)


EDITS = st.one_of(
    st.tuples(st.just("type"), st.text(alphabet="ab_ (),.:\n", min_size=1, max_size=4)),
    st.tuples(st.just("delete"), st.integers(1, 6)),
    st.tuples(st.just("jump"), st.integers(0, len(DOC))),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.integers(len(DOC) // 3, len(DOC)), edits=st.lists(EDITS, min_size=1, max_size=12))
def test_prompts_while_typing_equal_those_of_a_fresh_builder(shipped, start, edits):
    tokenizer, config = shipped
    typing = PromptBuilder(tokenizer, config)
    text, offset = DOC, start
    typing.build(_request(text, offset), 16)
    for kind, arg in edits:
        if kind == "type":
            text, offset = text[:offset] + arg + text[offset:], offset + len(arg)
        elif kind == "delete":
            text, offset = text[: max(0, offset - arg)] + text[offset:], max(0, offset - arg)
        else:
            offset = min(arg, len(text))
        request = _request(text, offset)
        got, fresh = typing.build(request, 16), PromptBuilder(tokenizer, config).build(request, 16)
        assert got.tokens == fresh.tokens and got.prefix_start == fresh.prefix_start


def test_typing_encodes_only_the_window_that_fits(shipped):
    tokenizer, config = shipped
    builder = PromptBuilder(tokenizer, config)
    offset = len(DOC) * 2 // 3
    builder.build(_request(DOC, offset), 16)
    seen: list[str] = []
    encode = tokenizer.encode
    builder.tok = type("Counting", (), {"encode": lambda _, s: seen.append(s) or encode(s),
                                        "token_bytes": tokenizer.token_bytes})()
    too_long = dict(builder._memo("engine.py").too_long)  # windows over budget on the last keystroke
    text = DOC[:offset] + "x" + DOC[offset:]
    builder.build(_request(text, offset + 1), 16)
    windows = [s for s in seen if len(s) > 20]
    prefix = text[:offset + 1]
    assert all(prefix.endswith(w) for w in windows)  # prefix windows only: the suffix is remembered
    # the window that fits, once; before it only a window that was over budget by less than
    # typing could undo (TOO_LONG_MARGIN), tried again
    assert len(windows) <= 2 and all(len(prefix) - len(w) in too_long for w in windows[:-1])


def test_a_keystroke_re_encodes_only_its_own_line(shipped):
    tokenizer, config = shipped
    builder = PromptBuilder(tokenizer, config)
    doc = "def run():\n" + "".join(f"    value_{i} = compute(value_{i - 1}, {i})\n" for i in range(1, 300))
    offset = doc.index("    value_250 =") + 10  # in the middle of a line
    builder.build(_request(doc, offset), 16)
    seen: list[str] = []
    encode = tokenizer.encode
    tokenizer.encode = lambda s: seen.append(s) or encode(s)
    try:
        text = doc[:offset] + "x" + doc[offset:]
        got = builder.build(_request(text, offset + 1), 16)
    finally:
        del tokenizer.encode
    line_start = text.rfind("\n", 0, offset) + 1
    assert seen and max(map(len, seen)) <= offset + 1 - line_start  # the cursor's line, not the window
    assert got.tokens == PromptBuilder(tokenizer, config).build(_request(text, offset + 1), 16).tokens


# code, blank lines, CRLF, tabs, and whitespace the pre-tokeniser treats apart (no-break
# space, form feed, vertical tab, line separator) where a line starts
PIECES = st.lists(st.sampled_from(["def", " f", "(x)", ":", "\n", "\n    ", "\r\n", "\t", "  ", "\u00a0", "\f",
                                   "\x0b", "\u2028", "x_1", "123", "#", "é", "<|endoftext|>", " \n", "\n\n"]),
                  min_size=1, max_size=80).map("".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(head=PIECES, old_tail=PIECES, new_tail=PIECES, padding=st.integers(0, 400))
def test_encoding_reusing_the_last_texts_ids_equals_encoding_whole(shipped, head, old_tail, new_tail, padding):
    tokenizer, _ = shipped
    head = DOC[:padding * 3] + head  # past REUSE_MIN_CHARS often, so the ids are reused
    old, new = head + old_tail, head + new_tail
    assert tokenizer.encode_reusing(new, (old, tokenizer.encode(old))) == tokenizer.encode(new)


@pytest.fixture(scope="module")
def qwen_like():
    """A small BPE trained here with Qwen2's pre-tokeniser and normaliser (NFC)."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    from codecomplete.models.format.tokenizer import QWEN2_SPLIT_PATTERN

    hf = HFTokenizer(models.BPE())
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([DOC], trainer=trainer)
    return Tokenizer(hf)


QWEN_PIECES = st.lists(st.sampled_from(["def", " f", "(x)", "):", ":", ".", "\n", "\n    ", "\r\n", "\t", "  ", " \n",
                                        "\n\n", "\u00a0", "\f", "\x0b", "x_1", "123", "'s", "e\u0301", "\u0301", "é",
                                        "<|endoftext|>"]),
                       min_size=1, max_size=80).map("".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(head=QWEN_PIECES, old_tail=QWEN_PIECES, new_tail=QWEN_PIECES, padding=st.integers(0, 400))
def test_qwen_style_tokenizers_reuse_ids_after_a_line_break_and_equal_a_whole_encode(qwen_like, head, old_tail,
                                                                                    new_tail, padding):
    assert qwen_like.line_cut == "break"
    head = DOC[:padding * 3] + head
    old, new = head + old_tail, head + new_tail
    assert qwen_like.encode_reusing(new, (old, qwen_like.encode(old))) == qwen_like.encode(new)


TRICKY_ENDS = ["", "\n", " \n", "\n\n", "\r\n", "  x", "x", "):\n", "'s", "\u0301", "é", "\t\n ", "\u00a0"]


@pytest.mark.parametrize("which", ["shipped", "qwen_like"])
def test_every_cut_a_rule_picks_splits_the_encoding_whatever_follows(request, which):
    """Each cut the tokenizer's rule picks before an offset e of a text full of blank lines,
    indentation, CRLF and punctuation before line breaks: the ids of the part before it and
    of the rest, encoded apart, are the whole text's, whatever comes after e."""
    import random

    from codecomplete.models.format.tokenizer import _cut_before

    tok = request.getfixturevalue(which)
    tok = tok[0] if which == "shipped" else tok
    assert tok.line_cut in ("blank", "break")
    rng = random.Random(7)
    pieces = ["def", " f", "(x)", "):", ":", "\n", "\n    ", "\r\n", "\t", "  ", " \n", "\n\n", "\u00a0", "x_1", "#",
              "'s", "e\u0301"]
    text = DOC[:600] + "".join(rng.choice(pieces) for _ in range(150))
    checked = 0
    for e in range(len(DOC[:600]), len(text)):
        p = _cut_before(text, e, tok.line_cut)
        if p == 0:
            continue
        for end in TRICKY_ENDS:
            whole = text[:e] + end
            assert tok.encode(whole[:p]) + tok.encode(whole[p:]) == tok.encode(whole), (repr(whole[p - 8:p + 8]), end)
            checked += 1
    assert checked > 300


def test_a_qwen_style_keystroke_re_encodes_only_its_own_line(qwen_like):
    doc = "def run():\n" + "".join(f"    value_{i} = compute(value_{i - 1}, {i})\n" for i in range(1, 300))
    old = doc[: doc.index("    value_250 =") + 10]
    new = old + "x"
    seen: list[str] = []
    encode = qwen_like.encode
    qwen_like.encode = lambda s: seen.append(s) or encode(s)
    try:
        got = qwen_like.encode_reusing(new, (old, encode(old)))
    finally:
        del qwen_like.encode
    assert got == encode(new) and seen == ["    value_x"]  # after the line break, indentation and all


def test_tokenizers_that_may_merge_across_a_line_start_encode_whole(shipped, tmp_path):
    import json

    tokenizer, _ = shipped
    assert tokenizer.line_cut == "blank"
    model = json.loads(tokenizer._tok.to_str())
    # a pattern of no known cut (Qwen2's alternatives reordered: a letter run may start a line)
    model["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+|\p{L}+"
    (tmp_path / "t.json").write_text(json.dumps(model))
    other = Tokenizer.from_file(tmp_path / "t.json")
    assert other.line_cut is None
    old = DOC[:3000]
    new = old + "x"
    calls = []
    encode = other.encode
    other.encode = lambda s: calls.append(s) or encode(s)
    assert other.encode_reusing(new, (old, encode(old))) == encode(new)
    assert calls == [new]


def test_the_back_off_follows_the_model_unless_the_request_says(shipped):
    from dataclasses import replace

    tokenizer, config = shipped
    assert config.align_back_off == "needed"  # the shipped model's config.json
    text = "total = result.ste"
    removed = {}
    for setting in ("needed", "fixed"):
        builder = PromptBuilder(tokenizer, replace(config, align_back_off=setting))
        removed[setting] = builder.build(_request(text, len(text)), 16).back_off.removed
        forced = CompletionRequest(text=text, offset=len(text), path="a.py",
                                   options=replace(OPTS, back_off_needed=setting == "fixed"))
        removed["forced " + setting] = builder.build(forced, 16).back_off.removed
    assert removed["needed"] == removed["forced fixed"] and removed["fixed"] == removed["forced needed"]
    assert removed["fixed"].endswith(removed["needed"]) and len(removed["needed"]) < len(removed["fixed"])


def _reference_prefix_window(prefix: str, budget: int, encode) -> tuple[int, list[int]]:
    """The prefix window as first written: every line start of the prefix listed."""
    from codecomplete.prompt import CHARS_PER_TOKEN_GUESS, PREFIX_ANCHOR_LINES

    lines_start = [0] + [i + 1 for i, ch in enumerate(prefix) if ch == "\n"]
    n_lines = len(lines_start)
    guess_chars = max(0, len(prefix) - budget * CHARS_PER_TOKEN_GUESS)
    first = next((i for i, s in enumerate(lines_start) if s >= guess_chars), 0)
    anchor = (first // PREFIX_ANCHOR_LINES) * PREFIX_ANCHOR_LINES
    while True:
        start = lines_start[min(anchor, n_lines - 1)]
        tokens = encode(prefix[start:])
        if len(tokens) <= budget or anchor >= n_lines - 1:
            break
        anchor += PREFIX_ANCHOR_LINES
    return start, tokens[-budget:] if len(tokens) > budget else tokens


LINES = st.lists(st.one_of(st.sampled_from(["", "x = 1", "    return value", "def f(a, b):"]),
                           st.text(alphabet="ab (),", max_size=300)), max_size=120).map("\n".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=LINES, tail=st.text(alphabet="ab\n ", max_size=40), budget=st.sampled_from([4, 16, 60, 300]))
def test_the_prefix_window_is_the_one_every_line_start_listed_gives(shipped, prefix, tail, budget):
    """Finding only the lines near the window picks the start and tokens that listing every
    line start of the prefix does (empty files, one long line, blank lines, a line break
    at the end), with and without what the last keystrokes learned."""
    from codecomplete.prompt import _prefix_window

    tokenizer, _ = shipped
    text = prefix + tail
    want = _reference_prefix_window(text, budget, tokenizer.encode)
    assert _prefix_window(text, budget, tokenizer.encode) == want
    learned: dict[int, int] = {}
    _prefix_window(prefix, budget, tokenizer.encode, learned)
    assert _prefix_window(text, budget, tokenizer.encode, learned) == want


def test_the_prefix_window_where_a_line_starts_right_at_the_guess(shipped):
    import itertools

    from codecomplete.prompt import _prefix_window

    tokenizer, _ = shipped
    # dense lines (a token every 2 characters) and sparse ones (a token for 30 blanks: the
    # window from the guessed line fits, so which line the guess picks decides the window)
    for line_text in ("ab cd\n", " " * 28 + "x\n"):
        for budget, lines, last in itertools.product((4, 16, 60), range(40), range(64)):
            text = line_text * lines + "x" * last  # the guess lands on every offset of the last lines
            assert _prefix_window(text, budget, tokenizer.encode) == \
                _reference_prefix_window(text, budget, tokenizer.encode), (line_text, budget, lines, last)
