"""Scope truncation, suffix overlap, repetition cuts and dedupe: pure functions on strings."""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from typing import NamedTuple

from codecomplete.languages import Language
from codecomplete.request import Candidate

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
MAX_LINE_CHARS = 2_000  # the cursor line is read this far each way (minified files are one line)
MAX_BLANK_LINES = 1  # a multi-line completion stops at the second blank line in a row
MAX_PERIOD_CHARS = 40  # longest repeated unit cut_repetition looks for inside a line
MAX_PERIOD_LINES = 8  # longest repeated block of lines cut_repetition looks for
MIN_REPEATS_IN_LINE = 6  # a unit must repeat this often to the end to count as a loop


# ---------------------------------------------------------------- bracket scanner


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


def _line_start(text: str, index: int) -> int:
    return text.rfind("\n", 0, index) + 1


def _cursor_line_start(prefix: str) -> int:
    """Where the cursor line starts, or MAX_LINE_CHARS back if it is longer."""
    lowest = max(0, len(prefix) - MAX_LINE_CHARS)
    newline = prefix.rfind("\n", lowest)
    return newline + 1 if newline >= 0 else lowest


def _cursor_line_end(suffix: str) -> int:
    """Where the cursor line ends in suffix (its newline), or -1 if not within MAX_LINE_CHARS."""
    return suffix.find("\n", 0, MAX_LINE_CHARS)


def _line_suffix(suffix: str) -> str:
    """The rest of the cursor line after the cursor, at most MAX_LINE_CHARS."""
    newline = _cursor_line_end(suffix)
    return suffix[:newline] if newline >= 0 else suffix[:MAX_LINE_CHARS]


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


# ---------------------------------------------------------------- scope


def _indent_of(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _width(indent: str) -> int:
    return len(indent.expandtabs(4))


def _indent_unit(lines: list[str], lang: Language | None) -> str:
    """The file's indentation step, from the smallest increase between consecutive lines."""
    steps: dict[str, int] = {}
    previous = None
    for line in lines[-200:]:
        if not line.strip():
            continue
        indent = _indent_of(line)
        if previous is not None and len(indent) > len(previous) and indent.startswith(previous):
            step = indent[len(previous) :]
            steps[step] = steps.get(step, 0) + 1
        previous = indent
    if steps:
        return max(steps, key=lambda s: (steps[s], -len(s)))
    return lang.indent_unit if lang else "    "


@dataclass
class CompletionScope:
    """How far one request's completions may reach; decided once per request."""

    multiline: bool
    base_indent: str  # multi-line: every line keeps at least this; single-line: the line's indent
    language: Language | None = None
    suffix_closes_block: bool = True  # the block's closer already follows the cursor
    start_string: str | None = None  # the cursor sits inside this string delimiter
    start_comment: str | None = None
    # brackets opened on the cursor line before the cursor and closed by nothing after it: the
    # completion closes them as part of finishing the line (`if (|` -> `x > 0):` and on)
    line_open: tuple[str, ...] = ()
    max_blank_lines: int = MAX_BLANK_LINES
    # the state after each run of whole lines seen so far: the decode loop calls stop_index
    # once per token with a growing text, so a call only reads the newest line
    _lines_seen: dict[str, _LinesState] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def stop_index(self, generated: str) -> int | None:
        """Where a completion must end given the text generated so far; None to keep going."""
        if not self.multiline:
            newline = generated.find("\n")
            return None if newline < 0 else newline
        head_end = generated.rfind("\n") + 1
        state = self._whole_lines(generated, head_end)
        if state.stop is None and head_end < len(generated):
            state = self._advance(state, generated, head_end, len(generated))
        return state.stop

    def _whole_lines(self, generated: str, head_end: int) -> _LinesState:
        """The state after generated[:head_end], built from the longest run already seen."""
        ends = []
        end = head_end
        while end > 0 and generated[:end] not in self._lines_seen:
            ends.append(end)
            end = generated.rfind("\n", 0, end - 1) + 1
        if end > 0:
            state = self._lines_seen[generated[:end]]
        else:
            start = ScanState(stack=list(self.line_open), string=self.start_string, comment=self.start_comment)
            state = _LinesState(start, content_end=0, blank_run=0)
        if len(self._lines_seen) > 4096:
            self._lines_seen.clear()
        for line_end in reversed(ends):
            state = self._advance(state, generated, end, line_end)
            self._lines_seen[generated[:line_end]] = state
            end = line_end
        return state

    def _advance(self, state: _LinesState, generated: str, start: int, end: int) -> _LinesState:
        """The state after one more line, generated[start:end] (with its newline if whole)."""
        if state.stop is not None:
            return state
        line = generated[start:end]
        scan = state.scan.copy()
        found = scan_brackets(line, self.language, scan, floor=0)[1]
        underflow = None if found is None else start + found
        content_end, blank_run = state.content_end, state.blank_run
        text = line.rstrip("\n")
        body = text.lstrip(" \t")
        if start == 0:  # the rest of the cursor line: no indentation rule
            content_end = len(text.rstrip())
        elif not body:
            if line.endswith("\n"):
                blank_run += 1
                if blank_run > self.max_blank_lines:
                    return _LinesState(scan, content_end, blank_run, stop=content_end)
        elif underflow != start + len(text) - len(body):  # a line that starts by closing: below
            if _width(text[: len(text) - len(body)]) < _width(self.base_indent):
                return _LinesState(scan, content_end, blank_run, stop=content_end)
            blank_run = 0
            content_end = start + len(text.rstrip())
        if underflow is None:
            return _LinesState(scan, content_end, blank_run)
        if not self.suffix_closes_block:  # nothing after the cursor closes it: keep the closer
            return _LinesState(scan, content_end, blank_run, stop=underflow + 1)
        cut = start if not generated[start:underflow].strip() else underflow
        return _LinesState(scan, content_end, blank_run, stop=len(generated[:cut].rstrip()))


class _LinesState(NamedTuple):
    """CompletionScope.stop_index's reading after some whole lines."""

    scan: ScanState
    content_end: int  # end of the last line with text that the completion may keep
    blank_run: int
    stop: int | None = None


def decide_scope(
    prefix: str, suffix: str, language: Language | None, multiline: bool | None = None
) -> CompletionScope:
    """Single-line (mid-line: finish the line) or multi-line (cursor at an empty block start)."""
    lang = language
    line_begin = _cursor_line_start(prefix)
    line_prefix = prefix[line_begin:]
    line_suffix = _line_suffix(suffix)
    state = prefix_state(prefix, lang)

    # the line that would open the block: the cursor line itself, or the last non-blank one above
    opener_line, on_opener_line = None, False
    if not line_suffix.strip() and state.string is None and state.comment is None:
        if line_prefix.strip():
            opener_line, on_opener_line = line_prefix, True
        else:
            end = line_begin - 1
            for _ in range(50):
                if end < 0:
                    break
                start = prefix.rfind("\n", max(0, end - MAX_LINE_CHARS), end) + 1
                if prefix[start:end].strip():
                    opener_line = prefix[start:end]
                    break
                end = start - 1
    opener = ""
    if opener_line is not None:
        code = code_part(opener_line, lang).rstrip()
        openers = lang.block_openers if lang else ("(", "[", "{", ":")
        if code and code[-1] in openers:
            opener = code[-1]
            if opener == ":" and (state.stack or (lang and lang.block_style != "indent")):
                opener = ""  # a dict value or a slice, not a block
            elif opener in "([" and on_opener_line:
                opener = ""  # `foo(|`: the arguments usually fit on the line

    prefix_lines = prefix[max(0, len(prefix) - PREFIX_SCAN_CHARS) :].split("\n")
    if opener:
        opener_indent = _indent_of(opener_line)
        if not on_opener_line and _width(line_prefix) > _width(opener_indent):
            base = line_prefix
        else:
            base = opener_indent + _indent_unit(prefix_lines, lang)
    else:
        base = _indent_of(line_prefix)
    is_multiline = bool(opener) if multiline is None else multiline

    suffix_closes = True
    line_open: tuple[str, ...] = ()
    if is_multiline and opener != ":":
        window = suffix[:SUFFIX_SCAN_CHARS]
        start = ScanState(string=state.string, comment=state.comment)
        suffix_closes = scan_brackets(window, lang, start)[1] is not None
        if not suffix_closes and state.string is None and state.comment is None:
            line_open = tuple(scan_brackets(line_prefix, lang, ScanState())[0].stack)
    return CompletionScope(
        multiline=is_multiline,
        base_indent=base,
        language=lang,
        suffix_closes_block=suffix_closes,
        start_string=state.string,
        start_comment=state.comment,
        line_open=line_open,
    )


# ---------------------------------------------------------------- overlap, repetition


def _line_cost(text: str, lang: Language | None) -> int:
    return scan_brackets(text, lang)[0].cost()


def _window_cost(start: ScanState, text: str, suffix_window: str, lang: Language | None) -> int:
    state = scan_brackets(text, lang, start.copy())[0]
    return scan_brackets(suffix_window, lang, state)[0].cost()


def _same_line(candidate_line: str, suffix_line: str, partial: bool) -> bool:
    a, b = candidate_line.strip(), suffix_line.strip()
    return a == b or (partial and bool(a) and b.startswith(a))


def drop_suffix_overlap(
    text: str, suffix: str, lang: Language | None = None, prefix: str = ""
) -> str:
    """Remove the end of text that repeats what follows the cursor (closers, quotes, next lines)."""
    if not text or not suffix:
        return text
    newline = _cursor_line_end(suffix)
    line_suffix = _line_suffix(suffix).rstrip()
    line_prefix = prefix[_cursor_line_start(prefix) :]

    # the rest of the cursor line, or the start of it, retyped at the end of the completion
    if line_suffix:
        last_line_start = _line_start(text, len(text))
        head, last = text[:last_line_start], text[last_line_start:]
        context = (line_prefix if not head else "") + last
        full_cost = _line_cost(context + line_suffix, lang)
        for k in range(min(len(line_suffix), len(last)), 0, -1):
            overlap = line_suffix[:k]
            if not last.endswith(overlap):
                continue
            cost = _line_cost(context[: len(context) - k] + line_suffix, lang)
            if cost < full_cost or (
                k == len(line_suffix) and cost <= full_cost and overlap.strip()
            ):
                return text[: len(text) - k]

    # the lines after the cursor line, retyped by a multi-line completion
    if "\n" not in text or newline < 0:
        return text
    text_lines = text.split("\n")
    next_lines = [
        line
        for line in suffix[newline + 1 : newline + 1 + SUFFIX_SCAN_CHARS].split("\n")
        if line.strip()
    ]
    if not next_lines:
        return text
    first = 0 if not line_prefix.strip() else 1
    for j in range(first, len(text_lines)):
        tail = [line for line in text_lines[j:] if line.strip()]
        if not text_lines[j].strip() or not tail or len(tail) > len(next_lines):
            continue
        if all(
            _same_line(t, s, partial=i == len(tail) - 1)
            for i, (t, s) in enumerate(zip(tail, next_lines, strict=False))
        ):
            kept = "\n".join(text_lines[:j])
            start = prefix_state(prefix, lang)
            window = suffix[:SUFFIX_SCAN_CHARS]
            if _window_cost(start, kept, window, lang) <= _window_cost(start, text, window, lang):
                return kept
            break
    return text


def _periodic_start(seq, period: int) -> int:
    """Smallest start such that seq[start:] repeats with the given period."""
    i = len(seq) - period - 1
    while i >= 0 and seq[i] == seq[i + period]:
        i -= 1
    return i + 1


def _substantial(lines: list[str]) -> bool:
    """Enough content that repeating it is a loop, not `}` or a blank line."""
    content = "".join(line.strip() for line in lines)
    return len(content) >= 3 and any(ch.isalnum() for ch in content)


def cut_repetition(text: str) -> str:
    """Cut a repetition loop, keeping the first occurrence: a line three times in a row, or
    a block of lines or a unit within a line that repeats until the text ends. Lines compare
    without indentation (the first line starts after the cursor's)."""
    lines = text.split("\n")
    keys = [line.strip() for line in lines]
    for i in range(len(keys) - 2):
        if keys[i] == keys[i + 1] == keys[i + 2] and _substantial(keys[i : i + 1]):
            return "\n".join(lines[: i + 1])
    # blocks of lines; the last line may be cut short by the token limit
    body = text.rstrip("\n").split("\n")
    body_keys = [line.strip() for line in body]
    for period in range(1, MAX_PERIOD_LINES + 1):
        for complete, partial in ((body_keys, ""), (body_keys[:-1], body_keys[-1])):
            if len(complete) < 2 * period:
                continue
            start = _periodic_start(complete, period)
            repeats = (len(complete) - start) / period
            unit = complete[start : start + period]
            if repeats >= (3 if period == 1 else 2) and _substantial(unit):
                if complete[len(complete) - period].startswith(partial):
                    return "\n".join(body[: start + period])
    # a unit of characters repeating until the end
    for period in range(1, MAX_PERIOD_CHARS + 1):
        if len(text) < MIN_REPEATS_IN_LINE * period:
            break
        start = _periodic_start(text, period)
        run = len(text) - start
        unit = text[start : start + period]
        if run >= MIN_REPEATS_IN_LINE * period and run >= 12 and any(ch.isalnum() for ch in unit):
            return text[: start + period]
    return text


# ---------------------------------------------------------------- the whole stage


def _strip_end(text: str, line_suffix: str) -> str:
    if line_suffix.strip():  # something follows on the line: keep spaces that separate
        return text.rstrip("\n")
    return text.rstrip()


def clean_candidates(
    cands: list[Candidate], prefix: str, suffix: str, scope: CompletionScope
) -> list[Candidate]:
    """Truncate to scope, cut loops, drop suffix overlap, strip, drop empty and duplicates."""
    line_suffix = _line_suffix(suffix)
    kept: dict[str, int] = {}
    out: list[Candidate] = []
    for cand in cands:
        text = cand.text
        stop = scope.stop_index(text)
        if stop is not None:
            text = text[:stop]
        text = cut_repetition(text)
        text = drop_suffix_overlap(text, suffix, scope.language, prefix)
        text = _strip_end(text, line_suffix)
        if not text.strip():
            continue
        cleaned = dataclasses.replace(cand, text=text, score_parts=dict(cand.score_parts))
        if text in kept:
            i = kept[text]
            if cleaned.logprob > out[i].logprob:
                out[i] = cleaned
            continue
        kept[text] = len(out)
        out.append(cleaned)
    return out
