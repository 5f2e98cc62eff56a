"""The bracket and string lexer: where a left-to-right scan of code stands (open brackets,
inside a string or comment, stray closers). Scope decisions, post-processing and the
reranker's bracket check all read code through it."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from codecomplete.languages import Language
from codecomplete.text import MAX_LINE_CHARS

# Unknown languages still get bracket and quote rules, without comments.
GENERIC = Language(
    "generic",
    (),
    (),
    "",
    "",
    block_style="brace",
    line_comment="",
    block_comment=None,
    quotes=('"', "'"),
    char_literals=False,
)


PREFIX_SCAN_CHARS = 8_000  # how far back the bracket state at the cursor is computed
SUFFIX_SCAN_CHARS = 4_000  # how far forward the suffix is read for bracket questions

@dataclass
class ScanState:
    """Where a left-to-right scan stands: open brackets, inside a string or comment, errors."""

    stack: list[str] = field(default_factory=list)  # open brackets, innermost last
    string: str | None = None  # delimiter of the string the scan is inside
    comment: str | None = None  # "line" or "block"
    errors: int = 0  # stray or mismatched closers, unterminated one-line strings
    low: int = 0  # the shallowest the stack got during the last scan_brackets call

    def copy(self) -> ScanState:
        return ScanState(list(self.stack), self.string, self.comment, self.errors, self.low)

    def key(self) -> tuple:
        return (tuple(self.stack), self.string, self.comment, self.errors)

    def cost(self) -> int:
        """Bracket problems at the end of a scan: errors, unclosed brackets, open string."""
        return self.errors + len(self.stack) + (self.string is not None)


_OPENER, _CLOSER, _LINE_COMMENT, _BLOCK_COMMENT, _QUOTE = range(5)


@dataclass(frozen=True)
class _Lexer:
    outside: re.Pattern  # tokens that matter outside strings and comments
    kinds: dict[str, int]  # token -> _OPENER ... _QUOTE; a character literal is absent
    closers: dict[str, str]  # closer -> opener
    string_end: dict[str, re.Pattern]
    block_comment_end: str


_lexers: dict[str, _Lexer] = {}


def _lexer(lang: Language) -> _Lexer:
    lex = _lexers.get(lang.id)
    if lex is None:
        lex = _lexers[lang.id] = _build_lexer(lang)
    return lex


def _build_lexer(lang: Language) -> _Lexer:
    kinds: dict[str, int] = {}
    for open_, close in lang.brackets:
        kinds[open_], kinds[close] = _OPENER, _CLOSER
    if lang.line_comment:
        kinds[lang.line_comment] = _LINE_COMMENT
    if lang.block_comment:
        kinds[lang.block_comment[0]] = _BLOCK_COMMENT
    for quote in lang.quotes:
        kinds[quote] = _QUOTE
    alternatives = [re.escape(token) for token in sorted(kinds, key=len, reverse=True)]
    # a whole 'x' literal, so '(' is no bracket; a lone ' (a Rust lifetime) is nothing
    if lang.char_literals:
        alternatives.insert(0, r"'(?:\\.[^'\n]{0,9}|[^\\'\n])'")
    string_end = {
        q: re.compile(r"\\[\s\S]|" + re.escape(q) + ("" if q in lang.multiline_quotes else r"|\n"))
        for q in lang.quotes
    }
    return _Lexer(
        outside=re.compile("|".join(alternatives)),
        kinds=kinds,
        closers={close: open_ for open_, close in lang.brackets},
        string_end=string_end,
        block_comment_end=lang.block_comment[1] if lang.block_comment else "",
    )


def scan_brackets(
    text: str, lang: Language | None, state: ScanState | None = None, floor: int | None = None
) -> tuple[ScanState, int | None]:
    """Scan text from state (mutated); return it and the index of the first closer that
    pops below floor (default: the starting depth), or None."""
    lex = _lexer(lang or GENERIC)
    state = state if state is not None else ScanState()
    stack = state.stack
    floor = len(stack) if floor is None else floor
    underflow: int | None = None
    low = len(stack)
    pos, n = 0, len(text)
    while pos < n:
        if state.comment == "line":
            end = text.find("\n", pos)
            if end < 0:
                break
            state.comment, pos = None, end + 1
        elif state.comment == "block":
            end = text.find(lex.block_comment_end, pos)
            if end < 0:
                break
            state.comment, pos = None, end + len(lex.block_comment_end)
        elif state.string is not None:
            match = lex.string_end[state.string].search(text, pos)
            if match is None:
                break
            token, pos = match.group(), match.end()
            if token == state.string:
                state.string = None
            elif token == "\n":  # a one-line string left open
                state.string, state.errors = None, state.errors + 1
        else:
            for match in lex.outside.finditer(text, pos):
                token = match.group()
                kind = lex.kinds.get(token)
                if kind == _OPENER:
                    stack.append(token)
                elif kind == _CLOSER:
                    opener = lex.closers[token]
                    if stack and stack[-1] == opener:
                        stack.pop()
                        depth = len(stack)
                    elif opener in stack:
                        depth = len(stack) - 1 - stack[::-1].index(opener)
                        state.errors += len(stack) - 1 - depth  # closed over unclosed brackets
                        del stack[depth:]
                    else:
                        state.errors += 1
                        depth = -1
                    if underflow is None and depth < floor:
                        underflow = match.start()
                    low = min(low, len(stack))
                elif kind == _LINE_COMMENT:
                    state.comment, pos = "line", match.end()
                    break
                elif kind == _BLOCK_COMMENT:
                    state.comment, pos = "block", match.end()
                    break
                elif kind == _QUOTE:
                    state.string, pos = token, match.end()
                    break
                # else: a character literal, skipped whole
            else:
                break
    state.low = low
    return state, underflow

@functools.lru_cache(maxsize=16)
def _state_after(text: str, lang: Language | None) -> ScanState:
    return scan_brackets(text, lang)[0]


# A line that starts a top-level statement is almost never inside a string or comment:
# scanning from one keeps a mid-docstring start from inverting every string after it.
_TOP_LEVEL = {
    "indent": re.compile(r"^(?:(?:def|class|async|import|from)\b|@|if __name__)", re.M),
    "brace": re.compile(r"^[A-Za-z_#}]", re.M),
}


def prefix_state(prefix: str, lang: Language | None) -> ScanState:
    """Bracket/string state at the cursor, scanned over the last PREFIX_SCAN_CHARS of prefix."""
    start = 0
    if len(prefix) > PREFIX_SCAN_CHARS:
        cut = len(prefix) - PREFIX_SCAN_CHARS
        start = prefix.rfind("\n", max(0, cut - MAX_LINE_CHARS), cut) + 1 or cut
        safe = _TOP_LEVEL[(lang or GENERIC).block_style].search(prefix, start)
        if safe is not None and safe.start() < len(prefix) - PREFIX_SCAN_CHARS // 4:
            start = safe.start()
    return _state_after(prefix[start:], lang).copy()


def code_part(line: str, lang: Language | None) -> str:
    """The line without its trailing line comment."""
    marker = (lang or GENERIC).line_comment
    if not marker or marker not in line:
        return line
    state = ScanState()
    pos = 0
    while True:  # scan up to each comment marker; the first one outside a string starts the comment
        idx = line.find(marker, pos)
        if idx < 0:
            return line
        scan_brackets(line[pos:idx], lang, state)
        if state.string is None and state.comment is None:
            return line[:idx]
        scan_brackets(line[idx : idx + len(marker)], lang, state)
        pos = idx + len(marker)
