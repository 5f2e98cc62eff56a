"""The document text as the engine reads it: the size limit, the window around the cursor,
binary and surrogate cleaning, and the small character and line facts every stage shares
(word characters, indentation, the cursor line)."""

from __future__ import annotations

import dataclasses

from codecomplete.request import CompletionRequest, Neighbour

MAX_DOCUMENT_CHARS = 4_000_000  # bigger documents get an empty answer (no error)
WINDOW_BEFORE_CHARS = 64_000  # the engine reads at most this much text before the cursor...
WINDOW_AFTER_CHARS = 16_000  # ...and this much after it
NEIGHBOUR_CHARS = 32_000  # read of each other open document
MAX_WORD_CHARS = 256  # an identifier under the cursor is read this far back
MAX_LINE_CHARS = 2_000  # the cursor line is read this far each way (minified files are one line)
TAB_WIDTH = 4  # columns of a tab when indentation widths are compared


# -- the document ------------------------------------------------------------------------
def document_problem(text: str, offset: int) -> str | None:
    """Why a document gets no completions at offset (too big, binary around the cursor), or
    None when it may."""
    if len(text) > MAX_DOCUMENT_CHARS:
        return f"it has {len(text)} characters (limit {MAX_DOCUMENT_CHARS})"
    if "\x00" in text_window(text, offset)[0]:
        return "it looks binary (NUL characters)"
    return None


def text_window(text: str, offset: int, before: int = WINDOW_BEFORE_CHARS,
                after: int = WINDOW_AFTER_CHARS) -> tuple[str, int]:
    """(window, offset in it): the text around the cursor that the stages read.

    The edges move in steps of a quarter window and sit on line starts, so that while the
    user types they stay put and the engine's cached prompt stays valid.
    """
    if len(text) <= before + after:
        return text, offset
    step_before, step_after = max(before // 4, 1), max(after // 4, 1)
    start = max(0, -(-(offset - before) // step_before) * step_before)
    line_start = text.find("\n", start, offset)
    if start > 0 and line_start >= 0:
        start = line_start + 1
    end = min(len(text), (offset + after) // step_after * step_after)
    line_end = text.rfind("\n", offset, end)
    if end < len(text) and line_end >= 0:
        end = line_end + 1
    end = max(end, offset)
    return text[start:end], offset - start


def clean_text(text: str) -> str | None:
    """The text as the engine may read it; None for binary content (NUL bytes)."""
    if "\x00" in text:
        return None
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:  # lone surrogates (from JSON escapes): one "?" each, offsets stay
        return text.encode("utf-8", "replace").decode("utf-8")


def windowed_request(request: CompletionRequest) -> CompletionRequest | None:
    """The request as the stages read it: its document cut to the window around the cursor
    and cleaned, each neighbour cut to NEIGHBOUR_CHARS and cleaned (binary ones dropped);
    None when the document gets no completions (document_problem)."""
    if len(request.text) > MAX_DOCUMENT_CHARS:
        return None
    window, offset = text_window(request.text, request.offset)
    text = clean_text(window)
    if text is None:
        return None
    neighbours = []
    for nb in request.neighbours:
        nb_text = clean_text(nb.text[:NEIGHBOUR_CHARS])
        if nb_text:
            neighbours.append(nb if nb_text is nb.text else Neighbour(nb.path, nb_text, nb.language))
    if text is request.text and offset == request.offset and len(neighbours) == len(request.neighbours) \
            and all(a is b for a, b in zip(neighbours, request.neighbours, strict=True)):
        return request
    return dataclasses.replace(request, text=text, offset=offset, neighbours=neighbours)


# -- characters and lines ----------------------------------------------------------------
def is_word_char(ch: str) -> bool:
    """Identifier characters, as Vim's default 'iskeyword' and most completion menus see them."""
    return ch == "_" or ch.isalnum()


def partial_word_start(text: str, offset: int) -> int:
    """Offset where the identifier being typed at offset starts (offset itself if none)."""
    start = offset
    while start > 0 and offset - start < MAX_WORD_CHARS and is_word_char(text[start - 1]):
        start -= 1
    return start


def indent_of(line: str) -> str:
    """The line's leading spaces and tabs."""
    return line[: len(line) - len(line.lstrip(" \t"))]


def indent_width(line: str) -> int:
    """Columns of the line's indentation, a tab counting TAB_WIDTH."""
    return len(indent_of(line).expandtabs(TAB_WIDTH))


def start_of_line(text: str, index: int) -> int:
    """Where the line holding index starts."""
    return text.rfind("\n", 0, index) + 1


def cursor_line_start(prefix: str) -> int:
    """Where the cursor line starts, or MAX_LINE_CHARS back if it is longer."""
    lowest = max(0, len(prefix) - MAX_LINE_CHARS)
    newline = prefix.rfind("\n", lowest)
    return newline + 1 if newline >= 0 else lowest


def cursor_line_end(suffix: str) -> int:
    """Where the cursor line ends in suffix (its newline), or -1 if not within MAX_LINE_CHARS."""
    return suffix.find("\n", 0, MAX_LINE_CHARS)


def rest_of_line(suffix: str) -> str:
    """The rest of the cursor line after the cursor, at most MAX_LINE_CHARS."""
    newline = cursor_line_end(suffix)
    return suffix[:newline] if newline >= 0 else suffix[:MAX_LINE_CHARS]
