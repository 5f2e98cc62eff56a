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
    text = DOC[:offset] + "x" + DOC[offset:]
    builder.build(_request(text, offset + 1), 16)
    windows = [s for s in seen if len(s) > 20]
    assert len(windows) == 1 and text[:offset + 1].endswith(windows[0])  # the prefix window, once; the suffix is remembered


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
