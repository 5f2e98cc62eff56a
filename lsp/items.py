"""Engine candidates -> LSP items: inline completions and completion-menu entries."""

from __future__ import annotations

from lsprotocol import types

from codecomplete.request import Candidate

from .documents import Document

MAX_WORD_CHARS = 256


def is_word_char(ch: str) -> bool:
    """Identifier characters, as Vim's default 'iskeyword' and most completion menus see them."""
    return ch == "_" or ch.isalnum()


def partial_word_start(text: str, offset: int) -> int:
    """Offset where the identifier being typed at offset starts (offset itself if none)."""
    start = offset
    while start > 0 and offset - start < MAX_WORD_CHARS and is_word_char(text[start - 1]):
        start -= 1
    return start


def _line_end(text: str, offset: int) -> int:
    ends = [i for i in (text.find("\n", offset), text.find("\r", offset)) if i >= 0]
    return min(ends) if ends else len(text)


def ranked(candidates: list[Candidate]) -> list[Candidate]:
    """Candidates with text, best score first, each text once."""
    seen: set[str] = set()
    out = []
    for cand in sorted(candidates, key=lambda c: -c.score):
        if cand.text and cand.text not in seen:
            seen.add(cand.text)
            out.append(cand)
    return out


def inline_items(doc: Document, offset: int, candidates: list[Candidate], encoding: str) -> list[types.InlineCompletionItem]:
    """One item per candidate: insert at the cursor, replacing the suffix the candidate re-typed."""
    items = []
    start = doc.position_at(offset, encoding)
    for cand in ranked(candidates):
        end_offset = min(offset + max(cand.replace_suffix_chars, 0), _line_end(doc.text, offset))
        end = doc.position_at(end_offset, encoding) if end_offset > offset else start
        items.append(types.InlineCompletionItem(insert_text=cand.text, range=types.Range(start=start, end=end)))
    return items


def completion_items(doc: Document, offset: int, candidates: list[Candidate], encoding: str,
                     markdown: bool = False) -> list[types.CompletionItem]:
    """Menu entries: the first line of each candidate, as a text edit over the typed partial word.

    The edit starts where the identifier under the cursor starts and its newText begins with
    that partial word, so a menu that filters by the typed word (Neovim's omnifunc keeps
    items whose word starts with it; VS Code matches filterText) keeps our items. A menu is
    one line, so multi-line candidates contribute their first line (the whole candidate
    is in the documentation); inline completion carries the rest.
    """
    word_start = partial_word_start(doc.text, offset)
    partial = doc.text[word_start:offset]
    start = doc.position_at(word_start, encoding)
    items: list[types.CompletionItem] = []
    seen: set[str] = set()
    for cand in ranked(candidates):
        first_line = cand.text.replace("\r\n", "\n").replace("\r", "\n").split("\n", 1)[0]
        new_text = partial + first_line
        if not first_line.strip() or new_text in seen:
            continue
        seen.add(new_text)
        multiline = first_line != cand.text
        end_offset = offset
        if not multiline and cand.replace_suffix_chars > 0:
            end_offset = min(offset + cand.replace_suffix_chars, _line_end(doc.text, offset))
        end = doc.position_at(end_offset, encoding)
        documentation: str | types.MarkupContent | None = None
        if multiline:
            documentation = (types.MarkupContent(kind=types.MarkupKind.Markdown, value=f"```{doc.language_id}\n{partial}{cand.text}\n```")
                             if markdown else partial + cand.text)
        rank = len(items)
        items.append(types.CompletionItem(
            label=new_text.strip(),
            kind=types.CompletionItemKind.Text,
            detail="codecomplete",
            documentation=documentation,
            sort_text=f"{rank:04d}",
            filter_text=new_text,
            preselect=rank == 0 or None,
            insert_text_format=types.InsertTextFormat.PlainText,
            text_edit=types.TextEdit(range=types.Range(start=start, end=end), new_text=new_text),
        ))
    return items
