"""Fill-in-the-middle prompts within a token budget.

SPM (suffix first; our model):  [ctx] <pre><suf> suffix <mid> prefix   -> middle
PSM (most public models):       [ctx] <pre> prefix <suf> suffix <mid>   -> middle

[ctx] is snippets of other open files, each `<file_sep>path\\n snippet`, then the current
file's `<file_sep>path\\n` header. With SPM only the end of the prefix changes while the
user types, so everything before it keeps its KV cache.

The prefix window starts at a line boundary chosen on a coarse grid, so that it stays
put while the user types and the KV cache of the whole prompt survives keystrokes.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import PurePath

from codecomplete.alignment import BackOff, VocabTrie, back_off_prompt
from codecomplete.request import CompletionRequest, Neighbour

PREFIX_ANCHOR_LINES = 16  # the prefix window starts on a multiple of this many lines
CHARS_PER_TOKEN_GUESS = 6  # generous: only bounds how much text is tokenized
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MEMO_DOCUMENTS = 64  # documents whose last build is remembered (a team server's typists)


@dataclass
class Prompt:
    tokens: list[int]
    back_off: BackOff  # the prefix tokens removed for token alignment
    prefix_tokens: int
    suffix_tokens: int
    context_tokens: int
    prefix_start: int  # char offset in the document where the prefix window starts
    suffix_end: int  # char offset where the suffix window ends


TOO_LONG_MARGIN = 16  # typing more text cannot bring a window this far over budget back within it


def _prefix_window(prefix: str, budget: int, encode, too_long: dict[int, int] | None = None) -> tuple[int, list[int]]:
    """Start offset and tokens of the longest line-anchored tail of prefix within budget.
    too_long: window start -> token count, for windows known to be over budget (skipped
    without encoding); the windows found over budget now are added to it. Only the lines
    near the window are found (a count of line breaks before it, then a few finds), so a
    keystroke in a file of megabytes costs what one in a small file does."""
    # first guess from characters: the first line starting at or after it (line 0 if none),
    # then step forward on the anchor grid until it fits
    guess_chars = max(0, len(prefix) - budget * CHARS_PER_TOKEN_GUESS)
    first, first_start = 0, 0
    newline = prefix.find("\n", guess_chars - 1) if guess_chars > 0 else -1
    if newline >= 0:  # one pass of counting over the prefix in all
        first, first_start = prefix.count("\n", 0, newline) + 1, newline + 1
        n_lines = first + prefix.count("\n", first_start) + 1
    else:
        n_lines = prefix.count("\n") + 1
    anchor = (first // PREFIX_ANCHOR_LINES) * PREFIX_ANCHOR_LINES
    line, start = first, first_start
    while line > anchor:  # back to the anchor line's start
        start = prefix.rfind("\n", 0, start - 1) + 1
        line -= 1
    while True:
        if too_long is not None and too_long.get(start, 0) > budget + TOO_LONG_MARGIN and anchor < n_lines - 1:
            anchor += PREFIX_ANCHOR_LINES
            start, line = _line_start_after(prefix, start, line, min(anchor, n_lines - 1))
            continue
        tokens = encode(prefix[start:])
        if len(tokens) <= budget or anchor >= n_lines - 1:
            break
        if too_long is not None:
            too_long[start] = len(tokens)
        anchor += PREFIX_ANCHOR_LINES
        start, line = _line_start_after(prefix, start, line, min(anchor, n_lines - 1))
    if len(tokens) > budget:  # one enormous line: keep its tail
        tokens = tokens[-budget:]
    return start, tokens


def _line_start_after(text: str, start: int, line: int, target: int) -> tuple[int, int]:
    """The start offset of line `target` (>= line), from line `line` starting at `start`."""
    while line < target:
        start = text.index("\n", start) + 1
        line += 1
    return start, line


def _suffix_window(suffix: str, budget: int, encode, token_bytes) -> tuple[int, list[int]]:
    """Tokens of the head of suffix within budget, cut after a newline when it is cut."""
    tokens = encode(suffix[: budget * CHARS_PER_TOKEN_GUESS])
    if len(tokens) > budget:
        tokens = tokens[:budget]
        for i in range(len(tokens) - 1, 0, -1):
            if b"\n" in token_bytes[tokens[i]]:
                tokens = tokens[: i + 1]
                break
    n_chars = len(b"".join(token_bytes[t] for t in tokens).decode("utf-8", errors="ignore"))
    return n_chars, tokens


def workspace_name(path: str, roots: list[str]) -> str:
    """How a prompt names a file: relative to the innermost of the roots (workspace
    folders) that holds it, with that folder's name in front (`shop/src/cart.py`, as the
    training and evaluation data name files); a file outside every root by its own name.
    An absolute path would put this machine's directories into the prompt."""
    file = PurePath(path)
    best = None
    for root in roots:
        base = PurePath(root)
        if base != file and file.is_relative_to(base) and (best is None or len(base.parts) > len(best.parts)):
            best = base
    if best is None:
        return file.name or path
    return (PurePath(best.name) / file.relative_to(best)).as_posix()


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text))


def rank_snippets(neighbours: list[Neighbour], around_cursor: str, lines_per_snippet: int = 24,
                  current_path: str = "") -> list[tuple[float, str, str]]:
    """(similarity, path, snippet) for windows of other files, most similar first
    (Jaccard similarity of identifiers, as in common repo-level completion systems)."""
    query = _words(around_cursor)
    if not query:
        return []
    scored = []
    for nb in neighbours:
        if not nb.text or nb.path == current_path:
            continue
        lines = nb.text.splitlines(keepends=True)
        step = max(1, lines_per_snippet // 2)
        for start in range(0, max(1, len(lines)), step):
            snippet = "".join(lines[start : start + lines_per_snippet])
            words = _words(snippet)
            if not words:
                continue
            sim = len(query & words) / len(query | words)
            if sim > 0:
                scored.append((sim, nb.path, snippet))
    scored.sort(key=lambda s: -s[0])
    return scored


@dataclass
class _Memo:
    """What the last build for one document computed (see PromptBuilder.build)."""

    last_prefix: str = ""
    too_long: dict[int, int] = field(default_factory=dict)
    last_suffix: tuple[str, int, tuple[int, list[int]]] | None = None
    last_window: tuple[str, list[int]] | None = None  # the last prefix window encoded and its ids


class PromptBuilder:
    """Builds prompts for one model: its tokenizer and FIM facts. Builds for different
    documents may run at once; one document's builds must not (the engine serializes them)."""

    def __init__(self, tokenizer, config, trie: VocabTrie | None = None):
        self.tok = tokenizer
        self.cfg = config
        self.trie = trie or VocabTrie(tokenizer.token_bytes)
        self.special_ids = frozenset(config.special_ids)
        self._lock = threading.Lock()
        self._memos: OrderedDict[str, _Memo] = OrderedDict()

    def forget(self) -> None:
        """Drop what earlier requests taught (see build)."""
        with self._lock:
            self._memos.clear()

    def _memo(self, path: str) -> _Memo:
        with self._lock:
            memo = self._memos.get(path)
            if memo is None:
                memo = self._memos[path] = _Memo()
                while len(self._memos) > MEMO_DOCUMENTS:
                    self._memos.popitem(last=False)
            self._memos.move_to_end(path)
            return memo

    def _encode_window(self, memo: _Memo, text: str) -> list[int]:
        """A prefix window's ids: typing changes the end of the last window encoded, and the
        tokenizer keeps its ids up to the last line start the two share (encode_reusing)."""
        reusing = getattr(self.tok, "encode_reusing", None)
        ids = reusing(text, memo.last_window) if reusing is not None else self.tok.encode(text)
        memo.last_window = (text, ids)
        return ids

    def _header(self, path: str) -> list[int]:
        if self.cfg.file_sep_id < 0 or not path:
            return []
        return [self.cfg.file_sep_id] + self.tok.encode(path + "\n")

    def _context(self, request: CompletionRequest, budget: int) -> list[int]:
        if budget <= 0 or not request.neighbours:
            return []
        around = request.text[max(0, request.offset - 1500) : request.offset + 300]
        out: list[int] = []
        used_paths: set[str] = set()
        for _sim, path, snippet in rank_snippets(request.neighbours, around, current_path=request.path):
            if path in used_paths:
                continue  # one snippet per file keeps the context diverse
            # each snippet reads like a whole file packed before this one in training:
            # <file_sep>path\n text <eos>
            eos = self.cfg.eos_ids[:1]
            toks = self._header(path) + self.tok.encode(snippet) + eos if self.cfg.file_sep_id >= 0 else []
            if not toks or len(out) + len(toks) > budget:
                continue
            out = toks + out  # most similar ends up nearest the cursor
            used_paths.add(path)
        return out

    def build(self, request: CompletionRequest, max_new_tokens: int) -> Prompt:
        opts = request.options
        room = self.cfg.max_seq_len - max_new_tokens - 8
        if room <= 16:
            raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room in a {self.cfg.max_seq_len}-token context")
        pre_budget = min(opts.prefix_tokens, room * 2 // 3)
        suf_budget = min(opts.suffix_tokens, room - pre_budget) if self.cfg.has_fim else 0
        prefix, suffix = request.prefix, request.suffix
        # while the user types, the prefix only grows: windows that were far over budget on
        # the document's last keystroke still are, and the suffix is the same text (the two
        # costly encodes)
        memo = self._memo(request.path)
        if not (memo.last_prefix and prefix.startswith(memo.last_prefix)):
            memo.too_long = {}
        prefix_start, prefix_toks = _prefix_window(prefix, pre_budget, lambda text: self._encode_window(memo, text),
                                                   memo.too_long)
        memo.last_prefix = prefix
        suffix_len, suffix_toks = 0, []
        if suf_budget:
            head = suffix[: suf_budget * CHARS_PER_TOKEN_GUESS]
            if memo.last_suffix is not None and memo.last_suffix[0] == head and memo.last_suffix[1] == suf_budget:
                suffix_len, suffix_toks = memo.last_suffix[2]
            else:
                suffix_len, suffix_toks = _suffix_window(suffix, suf_budget, self.tok.encode, self.tok.token_bytes)
                memo.last_suffix = (head, suf_budget, (suffix_len, suffix_toks))
        bo = back_off_prompt(prefix_toks, opts, self.cfg, self.tok.token_bytes, self.special_ids, self.trie)
        header = self._header(request.path)
        ctx_budget = min(opts.neighbour_tokens, room - len(prefix_toks) - len(suffix_toks) - len(header) - 4)
        ctx = self._context(request, ctx_budget) + header
        bos = [self.cfg.bos_id] if self.cfg.bos_id >= 0 else []
        c = self.cfg
        if not c.has_fim:
            tokens = bos + ctx + bo.kept
        elif c.fim_order == "spm":
            tokens = bos + ctx + [c.fim_prefix_id, c.fim_suffix_id] + suffix_toks + [c.fim_middle_id] + bo.kept
        else:
            tokens = bos + ctx + [c.fim_prefix_id] + bo.kept + [c.fim_suffix_id] + suffix_toks + [c.fim_middle_id]
        return Prompt(tokens=tokens, back_off=bo, prefix_tokens=len(bo.kept), suffix_tokens=len(suffix_toks),
                      context_tokens=len(ctx), prefix_start=prefix_start,
                      suffix_end=request.offset + suffix_len)
