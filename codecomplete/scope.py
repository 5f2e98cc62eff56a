"""The scope decision: single line or block, decided once per request from the syntax at
the cursor, and the stop rule that follows from it. The decode loop asks the scope after
every token where the text must end (`stop_bytes`); the engine then applies the late
rules for a candidate the deadline or the patience rule stopped (`finish`). That is the
only place a candidate is cut to its scope."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from codecomplete.languages import Language
from codecomplete.lexer import (
    PREFIX_SCAN_CHARS,
    SUFFIX_SCAN_CHARS,
    ScanState,
    code_part,
    prefix_state,
    scan_brackets,
)
from codecomplete.request import StopReason
from codecomplete.text import (
    MAX_LINE_CHARS,
    cursor_line_start,
    indent_of,
    indent_width,
    rest_of_line,
)

MAX_BLANK_LINES = 1  # a multi-line completion stops at the second blank line in a row


def _indent_unit(lines: list[str], lang: Language | None) -> str:
    """The file's indentation step, from the smallest increase between consecutive lines."""
    steps: dict[str, int] = {}
    previous = None
    for line in lines[-200:]:
        if not line.strip():
            continue
        indent = indent_of(line)
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

    def stop_bytes(self, visible: bytes) -> int | None:
        """stop_index for the decode loop, which holds bytes: how many of them to keep."""
        text = visible.decode("utf-8", errors="ignore")
        cut = self.stop_index(text)
        return None if cut is None else len(text[:cut].encode("utf-8"))

    def finish(self, text: str, stop_reason: str) -> str | None:
        """The shown text of a candidate the decode loop ended (already cut by stop_bytes),
        or None to drop it: one stopped early by patience leaves an unfinished line, and a
        block stopped by the deadline or patience is cut at its last full line."""
        late = stop_reason in (StopReason.DEADLINE, StopReason.PATIENCE)
        if not self.multiline:
            return None if stop_reason == StopReason.PATIENCE else text
        if late and "\n" in text:
            return text[: text.rfind("\n")]
        return text

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
            if indent_width(text) < indent_width(self.base_indent):
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
    line_begin = cursor_line_start(prefix)
    line_prefix = prefix[line_begin:]
    line_suffix = rest_of_line(suffix)
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
        opener_indent = indent_of(opener_line)
        if not on_opener_line and indent_width(line_prefix) > indent_width(opener_indent):
            base = line_prefix
        else:
            base = opener_indent + _indent_unit(prefix_lines, lang)
    else:
        base = indent_of(line_prefix)
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
