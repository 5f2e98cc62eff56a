"""The document text as the engine reads it: limits, the window, cleaning, words, indentation."""

from __future__ import annotations

import dataclasses

from codecomplete.request import CompletionRequest, Neighbour
from codecomplete.text import (
    MAX_DOCUMENT_CHARS,
    NEIGHBOUR_CHARS,
    WINDOW_AFTER_CHARS,
    WINDOW_BEFORE_CHARS,
    clean_text,
    document_problem,
    indent_of,
    indent_width,
    partial_word_start,
    text_window,
    windowed_request,
)


def test_partial_word_covers_identifier_characters_only():
    text = "x = self.valü"
    assert text[partial_word_start(text, len(text)):] == "valü"
    assert partial_word_start("a + ", 4) == 4


def test_text_window_keeps_the_cursor_and_stays_put_while_typing():
    text = "".join(f"line {i}\n" for i in range(40_000))
    offset = len(text) // 2
    window, local = text_window(text, offset, before=10_000, after=2_000)
    assert window[local - 20:local + 20] == text[offset - 20:offset + 20]
    assert len(window) <= 12_000 and (local == 0 or text[offset - local - 1] == "\n")
    window2, local2 = text_window(text, offset + 3, before=10_000, after=2_000)
    assert offset - local == offset + 3 - local2  # same start one keystroke later
    assert text_window("short", 3) == ("short", 3)


def test_clean_text_rejects_binary_and_replaces_lone_surrogates_in_place():
    assert clean_text("a\x00b") is None
    assert clean_text("a\ud800b") == "a?b"
    assert clean_text("é😀") == "é😀"


def test_document_problem_names_huge_and_binary_documents():
    assert document_problem("x = 1\n", 3) is None
    assert "limit" in document_problem("x" * (MAX_DOCUMENT_CHARS + 1), 0)
    assert "binary" in document_problem("a\x00b", 1)
    far = "\x00" + "x = 1\n" * 20_000  # a NUL outside the window around the cursor is no problem
    assert document_problem(far, len(far)) is None


def test_windowed_request_cuts_the_document_and_neighbours_and_keeps_small_ones():
    small = CompletionRequest(text="x = 1\n", offset=4, neighbours=[Neighbour("a.py", "y = 2\n")])
    assert windowed_request(small) is small  # nothing to cut: the same object, no copies
    text = "".join(f"line {i}\n" for i in range(40_000))
    offset = len(text) // 2
    neighbours = [Neighbour("big.py", "z" * (2 * NEIGHBOUR_CHARS)), Neighbour("bin.py", "a\x00b"),
                  Neighbour("s.py", "a\ud800b")]
    big = CompletionRequest(text=text, offset=offset, neighbours=neighbours)
    cut = windowed_request(big)
    assert (cut.text, cut.offset) == text_window(text, offset)
    assert len(cut.text) <= WINDOW_BEFORE_CHARS + WINDOW_AFTER_CHARS and cut.prefix.endswith(text[:offset][-100:])
    assert [(n.path, len(n.text)) for n in cut.neighbours] == [("big.py", NEIGHBOUR_CHARS), ("s.py", 3)]
    assert cut.cancel is big.cancel and big.text == text  # the caller's request is left as it was
    assert windowed_request(dataclasses.replace(small, text="a\x00b", offset=1)) is None


def test_indentation_helpers_count_tabs_as_four_columns():
    assert indent_of("\t  x = 1") == "\t  " and indent_of("x") == ""
    assert indent_width("\t  x = 1") == 6 and indent_width("    ") == 4


def test_a_request_pickles_with_its_cancel_token_state():
    import pickle

    request = CompletionRequest(text="x", offset=1)
    assert not pickle.loads(pickle.dumps(request)).cancel.cancelled
    request.cancel.cancel()
    assert pickle.loads(pickle.dumps(request)).cancel.cancelled
