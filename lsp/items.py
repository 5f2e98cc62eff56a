"""Engine candidates -> LSP items: inline completions and completion-menu entries."""

from __future__ import annotations

from lsprotocol import types

from codecomplete.request import Candidate
from codecomplete.text import partial_word_start

from .documents import Document


def inline_items(doc: Document, offset: int, candidates: list[Candidate], encoding: str) -> list[types.InlineCompletionItem]:
    """One item per candidate, in the engine's order (best first, each text once): insert at
    the cursor. Text that retypes what follows the cursor was already dropped by the engine."""
    start = doc.position_at(offset, encoding)
    cursor = types.Range(start=start, end=start)
    return [types.InlineCompletionItem(insert_text=cand.text, range=cursor) for cand in candidates if cand.text]


def completion_items(doc: Document, offset: int, candidates: list[Candidate], encoding: str,
                     markdown: bool = False) -> list[types.CompletionItem]:
    """Menu entries in the engine's order: the first line of each candidate, as a text edit
    over the typed partial word.

    The edit starts where the identifier under the cursor starts and its newText begins with
    that partial word, so a menu that filters by the typed word (Neovim's omnifunc keeps
    items whose word starts with it; VS Code matches filterText) keeps our items. A menu is
    one line, so multi-line candidates contribute their first line (the whole candidate
    is in the documentation); inline completion carries the rest.
    """
    word_start = partial_word_start(doc.text, offset)
    partial = doc.text[word_start:offset]
    start = doc.position_at(word_start, encoding)
    cursor = doc.position_at(offset, encoding)
    items: list[types.CompletionItem] = []
    seen: set[str] = set()
    for cand in candidates:
        first_line = cand.text.replace("\r\n", "\n").replace("\r", "\n").split("\n", 1)[0]
        new_text = partial + first_line
        if not first_line.strip() or new_text in seen:
            continue
        seen.add(new_text)
        multiline = first_line != cand.text
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
            text_edit=types.TextEdit(range=types.Range(start=start, end=cursor), new_text=new_text),
        ))
    return items
