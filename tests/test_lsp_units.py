"""The server's pure parts: positions, edits, settings, items."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lsprotocol import types

from codecomplete.lsp.documents import UTF8, UTF16, UTF32, Document, PositionError, code_units
from codecomplete.lsp.items import completion_items, inline_items
from codecomplete.lsp.server import prompt_path
from codecomplete.lsp.settings import Settings, apply_settings
from codecomplete.request import Candidate


def pos(line: int, col: int) -> types.Position:
    return types.Position(line=line, character=col)


def change(a: tuple[int, int], b: tuple[int, int], text: str) -> types.TextDocumentContentChangePartial:
    return types.TextDocumentContentChangePartial(range=types.Range(start=pos(*a), end=pos(*b)), text=text)


# -- positions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding, column", [(UTF16, 8), (UTF8, 11), (UTF32, 7)])
def test_offset_after_emoji_counts_code_units_of_the_encoding(encoding, column):
    doc = Document("u", "python", 1, 'x\ns = "😀é"; y')  # the closing quote: index 7 of line 1
    assert doc.offset_at(pos(1, column), encoding) == 2 + 7
    assert doc.position_at(2 + 7, encoding) == pos(1, column)


def test_lines_break_only_at_lsp_line_endings():
    doc = Document("u", "", 1, "a\r\nb\rc\nd\x0ce\u2028f")
    assert doc.line_count == 4
    assert doc.line_text(3) == "d\x0ce\u2028f"
    assert doc.offset_at(pos(1, 1), UTF16) == 4


def test_character_past_the_line_end_means_the_line_end_but_lines_must_exist():
    doc = Document("u", "", 1, "abc\ndef")
    assert doc.offset_at(pos(0, 99), UTF16) == 3
    with pytest.raises(PositionError, match="past the end"):
        doc.offset_at(pos(2, 0), UTF16)
    with pytest.raises(PositionError, match="negative"):
        doc.offset_at(SimpleNamespace(line=-1, character=0), UTF16)


def test_incremental_edits_after_surrogate_pairs():
    doc = Document("u", "", 1, "😀😀x\nline")
    doc.apply_change(change((0, 4), (0, 5), "yz"), UTF16)  # replace "x"
    assert doc.text == "😀😀yz\nline"
    doc.apply_change(change((0, 2), (1, 0), ""), UTF16)  # join the lines after the first emoji
    assert doc.text == "😀line"
    doc.apply_change(types.TextDocumentContentChangeWholeDocument(text="new"), UTF16)
    assert doc.text == "new" and doc.line_count == 1


def test_edit_ranges_past_the_end_are_clamped_not_fatal():
    doc = Document("u", "", 1, "abc\n")
    doc.apply_change(change((1, 0), (5, 0), "tail"), UTF16)
    assert doc.text == "abc\ntail"


@given(st.text(alphabet=st.sampled_from("ab\n\r😀é\t"), max_size=30), st.data())
def test_offsets_and_positions_round_trip(text, data):
    doc = Document("u", "", 1, text)
    for encoding in (UTF8, UTF16, UTF32):
        line = data.draw(st.integers(0, doc.line_count - 1))
        start = doc.line_starts[line]
        for index in range(len(doc.line_text(line)) + 1):
            p = doc.position_at(start + index, encoding)
            assert p.line == line and p.character == code_units(doc.line_text(line)[:index], encoding)
            assert doc.offset_at(p, encoding) == start + index


# -- items -----------------------------------------------------------------------------------------
def test_completion_items_keep_the_engine_order_merge_equal_first_lines_and_cover_the_partial_word():
    doc = Document("u", "python", 1, "    pri)\n")
    # the engine's order (best first); the menu shows one line, so two candidates whose
    # first lines agree give one entry, and a candidate whose first line is empty gives none
    cands = [Candidate("nt(y", score=0.1), Candidate("nt(x", score=0.9),
             Candidate("nt(x\n    z", score=0.95), Candidate("\n    pass", score=0.5)]
    items = completion_items(doc, 7, cands, UTF16)
    assert [i.label for i in items] == ["print(y", "print(x"]
    assert items[0].text_edit.range == types.Range(start=pos(0, 4), end=pos(0, 7))  # up to the cursor
    assert [i.sort_text for i in items] == ["0000", "0001"]


def test_inline_items_keep_the_engine_order_and_insert_at_the_cursor():
    doc = Document("u", "python", 1, "print()\n")
    cands = [Candidate("y", score=0.1), Candidate("x", score=0.9), Candidate("", score=1.0)]
    items = inline_items(doc, 6, cands, UTF16)
    assert [i.insert_text for i in items] == ["y", "x"]
    assert all(i.range == types.Range(start=pos(0, 6), end=pos(0, 6)) for i in items)


def test_multiline_candidates_give_their_first_line_to_the_menu_and_everything_inline():
    doc = Document("u", "python", 1, "if x:\n    ")
    cands = [Candidate("return x\nelse:\n    pass", score=1.0)]
    [item] = completion_items(doc, 10, cands, UTF16, markdown=True)
    assert item.text_edit.new_text == "return x" and "else:" in item.documentation.value
    [ghost] = inline_items(doc, 10, cands, UTF16)
    assert ghost.insert_text == cands[0].text and ghost.range == types.Range(start=pos(1, 4), end=pos(1, 4))


# -- settings ----------------------------------------------------------------------------------------
def test_settings_apply_good_values_and_keep_old_ones_for_bad_values(tmp_path):
    new, errors = apply_settings(Settings(), {"codecomplete": {
        "candidates": 8, "maxTokens": 0, "deadlineMs": 250.0, "runtime": "torch", "device": "gpu",
        "model": str(tmp_path), "enable": {"markdown": False, "go": "yes"}}})
    assert (new.candidates, new.max_tokens, new.deadline_ms, new.runtime, new.device) == (8, 48, 250, "torch", "cpu")
    assert new.model == str(tmp_path)
    assert not new.enabled_for("markdown") and new.enabled_for("go") and new.enabled_for("python")
    assert len(errors) == 3 and any("maxTokens" in e and "keeping 48" in e for e in errors)
    assert any("device" in e for e in errors) and any("enable.go" in e for e in errors)


def test_settings_multiline_maps_to_the_engine_scope_and_rejects_other_words():
    new, errors = apply_settings(Settings(), {"multiline": "never"})
    assert not errors and new.completion_options().multiline is False
    assert apply_settings(new, {"multiline": "always"})[0].completion_options().multiline is True
    back, errors = apply_settings(new, {"multiline": True})
    assert back.multiline == "never" and len(errors) == 1 and "auto" in errors[0]
    assert Settings().completion_options().multiline is None


def test_settings_reject_missing_model_folders_booleans_and_accept_top_level_keys(tmp_path):
    new, errors = apply_settings(Settings(), {"model": str(tmp_path / "nope"), "candidates": True, "maxTokens": 7})
    assert new.model == "" and new.candidates == 4 and new.max_tokens == 7 and len(errors) == 2


def test_settings_accept_the_settings_wrapper_in_initialization_options():
    from codecomplete.lsp.settings import section_of

    assert section_of({"settings": {"codecomplete": {"candidates": 2}}}) == {"candidates": 2}
    assert section_of({"codecomplete": {"candidates": 3}}) == {"candidates": 3}
    assert section_of({"candidates": 5}) == {"candidates": 5}


# -- prompt paths -------------------------------------------------------------------------------------
@pytest.mark.parametrize("uri, expected", [
    ("file:///home/ann/shop/src/cart.py", "shop/src/cart.py"),
    ("file:///home/ann/shop/vendor/lib/core.py", "lib/core.py"),  # the innermost folder wins
    ("file:///home/ann/shopping/list.py", "list.py"),  # a sibling whose name extends a folder's is outside
    ("file:///home/ann/shop", "shop"),  # the folder itself
    ("untitled:Untitled-1", "Untitled-1"),
    ("file:///srv/x.py", "x.py"),
])
def test_prompt_path_is_relative_to_the_workspace_folder_that_holds_the_file(uri, expected):
    roots = ["file:///home/ann/shop", "file:///home/ann/shop/vendor/lib"]
    assert prompt_path(uri, roots) == expected


def test_prompt_path_under_a_filesystem_root_workspace_has_no_leading_slash():
    assert prompt_path("file:///etc/app/conf.py", ["file:///"]) == "etc/app/conf.py"
