"""Open documents: incremental edits and LSP positions in the negotiated encoding.

LSP lines end at "\\n", "\\r\\n" or "\\r" (nothing else: str.splitlines would also split at
form feeds and U+2028), and a position's character counts code units of the negotiated
encoding: UTF-16 by default, UTF-8 or UTF-32 when negotiated. Python strings index code
points, so every position is converted here and nowhere else.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field, replace

from lsprotocol import types

UTF8, UTF16, UTF32 = "utf-8", "utf-16", "utf-32"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class PositionError(ValueError):
    """A position that does not exist in the document (its message is meant for the client)."""


def _char_units(ch: str, encoding: str) -> int:
    cp = ord(ch)
    if encoding == UTF16:
        return 2 if cp > 0xFFFF else 1
    return 1 if cp < 0x80 else 2 if cp < 0x800 else 3 if cp < 0x10000 else 4


def code_units(text: str, encoding: str) -> int:
    """Length of text in code units of the encoding."""
    if encoding == UTF32 or text.isascii():
        return len(text)
    if encoding == UTF8:
        return len(text.encode("utf-8", "surrogatepass"))
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def index_of_column(line: str, column: int, encoding: str) -> int:
    """Code-point index in line of a column in code units; past the end means the end.

    A column inside a character (half a surrogate pair, the middle of a UTF-8 sequence)
    lands before that character.
    """
    if encoding == UTF32 or line.isascii():
        return min(column, len(line))
    units = 0
    for index, ch in enumerate(line):
        units += _char_units(ch, encoding)
        if units > column:
            return index
    return len(line)


@dataclass
class Document:
    """One open text document; text is the editor's text, exactly."""

    uri: str
    language_id: str
    version: int
    text: str
    _line_starts: list[int] | None = field(default=None, repr=False)

    @property
    def line_starts(self) -> list[int]:
        """Code-point offset where each line starts (always at least [0])."""
        if self._line_starts is None:
            self._line_starts = [0, *(m.end() for m in _LINE_BREAK.finditer(self.text))]
        return self._line_starts

    @property
    def line_count(self) -> int:
        return len(self.line_starts)

    def line_text(self, line: int) -> str:
        """Text of one line without its line break."""
        starts = self.line_starts
        start = starts[line]
        end = starts[line + 1] if line + 1 < len(starts) else len(self.text)
        return self.text[start:end].rstrip("\r\n")

    def offset_at(self, position: types.Position, encoding: str, strict: bool = True) -> int:
        """Code-point offset of a client position.

        A character past the end of its line means the end of the line (the LSP rule). A line
        past the end of the document raises PositionError when strict, else means the end.
        """
        line, column = position.line, position.character
        if line < 0 or column < 0:
            if strict:
                raise PositionError(f"position {line}:{column} is negative")
            line, column = max(line, 0), max(column, 0)
        if line >= self.line_count:
            if strict:
                raise PositionError(
                    f"position {line}:{column} is past the end of {self.uri} ({self.line_count} lines)")
            return len(self.text)
        return self.line_starts[line] + index_of_column(self.line_text(line), column, encoding)

    def position_at(self, offset: int, encoding: str) -> types.Position:
        """Client position of a code-point offset (clamped into the document)."""
        offset = max(0, min(offset, len(self.text)))
        line = bisect.bisect_right(self.line_starts, offset) - 1
        start = self.line_starts[line]
        # An offset between "\r" and "\n" belongs to the end of the line.
        line_text = self.line_text(line)
        return types.Position(line=line, character=code_units(line_text[: offset - start], encoding))

    def snapshot(self) -> Document:
        """A copy that later edits leave alone (it shares the line starts computed so far)."""
        return replace(self)

    def apply_change(self, change: types.TextDocumentContentChangeEvent, encoding: str) -> None:
        """Apply one didChange content change (a ranged edit or the whole text)."""
        if isinstance(change, types.TextDocumentContentChangePartial):
            start = self.offset_at(change.range.start, encoding, strict=False)
            end = self.offset_at(change.range.end, encoding, strict=False)
            if end < start:
                start, end = end, start
            self.text = self.text[:start] + change.text + self.text[end:]
        else:
            self.text = change.text
        self._line_starts = None


class Documents:
    """The open documents by URI, most recently changed last."""

    def __init__(self) -> None:
        self._docs: dict[str, Document] = {}

    def open(self, item: types.TextDocumentItem) -> Document:
        doc = Document(item.uri, item.language_id, item.version, item.text)
        self._docs.pop(item.uri, None)
        self._docs[item.uri] = doc
        return doc

    def change(self, params: types.DidChangeTextDocumentParams, encoding: str) -> Document | None:
        doc = self._docs.pop(params.text_document.uri, None)
        if doc is None:
            return None
        self._docs[doc.uri] = doc
        for change in params.content_changes:
            doc.apply_change(change, encoding)
        doc.version = params.text_document.version
        return doc

    def close(self, uri: str) -> None:
        self._docs.pop(uri, None)

    def get(self, uri: str) -> Document | None:
        return self._docs.get(uri)

    def recent(self, exclude: str = "", limit: int = 8) -> list[Document]:
        """The most recently changed documents, newest first."""
        return [d for d in reversed(self._docs.values()) if d.uri != exclude][:limit]

    def __len__(self) -> int:
        return len(self._docs)
