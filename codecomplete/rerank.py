"""Tree-sitter checks of each candidate in place, and the final rank score."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from codecomplete.languages import Language, parser_for
from codecomplete.lexer import ScanState, code_part, prefix_state, scan_brackets
from codecomplete.request import Candidate
from codecomplete.text import indent_of, indent_width

# Lines parsed around the cursor: bounds the cost on huge files. The damage a candidate does
# shows near it (an unclosed string or bracket still reaches the window's end), and reparse
# cost grows with the text after the cursor, so fewer lines follow than precede.
WINDOW_LINES_BEFORE = 100
WINDOW_LINES_AFTER = 50
WINDOW_CHARS = 8_000  # per side, for files with very long lines
HEADER_SEARCH_CHARS = 200_000  # how far above the window to look for enclosing block headers
MAX_HEADER_CHARS = 400
CONTEXT_ROWS = 2  # error nodes count when they reach the candidate's rows or this many after;
# further away, error recovery reshuffles on its own, and the bracket check sees real damage

# Mean log-probabilities of plausible candidates for one prompt typically differ by 0.1-1 nat
# per token, so one syntax error outweighs a typical gap but not a candidate the model is sure of.
SYNTAX_WEIGHT = 1.0  # multiplies the whole syntax part
ERROR_NODE_PENALTY = 1.0  # per ERROR or MISSING node the candidate introduces
MAX_COUNTED_NODES = 3  # error recovery can split one mistake into many nodes
BRACKET_PENALTY = 0.5  # per bracket/quote left unbalanced; the parse usually flags these too
INCOMPLETE_PENALTY = 0.3  # ends mid-construct (`x = `, `if a:`); often still a useful prefix
# Among equally likely candidates a longer one saves more typing; log keeps this a tie-breaker.
LENGTH_WEIGHT = 0.02  # per nat of log(1 + characters)

_CONTINUATION_ENDINGS = tuple("&& || -> => :: = + - * / % & | ^ .".split())
_COMPLETE_ENDINGS = ("++", "--", "*/", "import *")
_CONTINUES_BLOCK = re.compile(r"[)\]}]|(?:else|elif|except|finally|catch)\b")
_PY_BLOCK_HEADER = re.compile(
    r"^\s*(?:async\s+)?(?:if|elif|else|for|while|def|class|try|except|finally|with|match|case)\b.*:$"
)


@dataclass
class SyntaxReport:
    """What inserting one candidate does to the parse around the cursor."""

    ok: bool
    new_error_nodes: int = 0
    new_missing_nodes: int = 0
    unbalanced_brackets: int = 0
    incomplete: bool = False


@dataclass
class _Baseline:
    """The document window without a candidate, parsed once per request."""

    tree: object
    prefix_bytes: bytes
    suffix_bytes: bytes  # the suffix window, without the closing tail
    tail: bytes  # closers for what is still open where the window ends
    suffix_is_whole: bool  # the suffix window runs to the end of the document
    cursor_row: int
    cursor_column: int  # in bytes
    error_rows: frozenset[int]
    prefix_state: ScanState
    suffix_window: str
    suffix_errors: int  # stray closers and broken strings in the suffix window, as it is
    suffix_scans: dict[tuple, _SuffixScan] = field(default_factory=dict)  # memo by scan state


class _SuffixScan(NamedTuple):
    errors: int  # stray closers and broken strings
    low: int  # the shallowest the bracket stack got
    tail: bytes  # closers for the brackets still open at the end


def _windows(prefix: str, suffix: str) -> tuple[int, str]:
    """Where the prefix window starts, and the suffix window: whole lines, WINDOW_CHARS at most."""
    lower = max(0, len(prefix) - WINDOW_CHARS)
    start = len(prefix)
    for _ in range(WINDOW_LINES_BEFORE + 1):
        newline = prefix.rfind("\n", lower, start)
        if newline < 0:
            break
        start = newline
    else:
        lower = start + 1
    if lower > 0 and start != lower - 1:  # the character cap struck first: begin at a line
        newline = prefix.find("\n", lower)
        lower = newline + 1 if 0 <= newline < len(prefix) else lower
    upper = min(len(suffix), WINDOW_CHARS)
    end = -1
    for _ in range(WINDOW_LINES_AFTER + 1):
        end = suffix.find("\n", end + 1, upper)
        if end < 0:
            return lower, suffix[:upper]
    return lower, suffix[:end]


def _enclosing_headers(prefix: str, window_start: int, lang: Language) -> str:
    """The lines above the window that open the blocks it sits in (`class A {`, `def f(`),
    so that a window cut from the middle of a class parses as it does in the file."""
    window = prefix[window_start : window_start + WINDOW_CHARS]
    first = next((line for line in window.split("\n") if _is_code_line(line, lang)), "")
    limit = indent_width(first)  # blocks the window closes later are opened by the headers found
    # after `} else {` or `):`, the line that opened the block is wanted
    closing_width = limit if _CONTINUES_BLOCK.match(first.lstrip()) else None
    indent_chars = len(indent_of(first))
    search_from = max(0, window_start - HEADER_SEARCH_CHARS)
    headers: list[str] = []
    pos = window_start
    while limit > 0 or closing_width is not None:
        # the last line above pos indented less (or, after a continuation, no more)
        allowed = indent_chars if closing_width is not None else indent_chars - 1
        found = (
            _last_line_indented(allowed).match(prefix, search_from, pos) if allowed >= 0 else None
        )
        if found is None:
            break
        start = prefix.rfind("\n", 0, found.end()) + 1
        end = prefix.find("\n", start, pos)
        line, pos = prefix[start : end if end >= 0 else pos], start
        if not _is_code_line(line, lang) or len(line) > MAX_HEADER_CHARS:
            continue
        width = indent_width(line)
        continues = _CONTINUES_BLOCK.match(line.lstrip()) is not None
        if closing_width is not None:
            if width > closing_width or continues:
                continue
            closing_width = None
        elif width >= limit:
            continue
        headers.append(line)
        limit, indent_chars = width, len(indent_of(line))
        if continues:
            closing_width = width
    return "".join(line + "\n" for line in reversed(headers))


@functools.cache
def _last_line_indented(max_chars: int) -> re.Pattern:
    """Matches up to the last line with at most max_chars of indentation (greedy, then back)."""
    return re.compile(rf"(?s:.*)^[ \t]{{0,{max_chars}}}(?=[^ \t\r\n])", re.M)


@functools.lru_cache(maxsize=2)  # callers of syntax_report pass one prefix per candidate
def _window_texts(prefix: str, suffix: str, lang: Language) -> tuple[str, str, bool, tuple]:
    """The text parsed before and after the cursor, whether the latter is all of the suffix,
    and the bracket state at the cursor (scanned from a safe start, not the window's)."""
    window_start, suffix_window = _windows(prefix, suffix)
    prefix_window = _enclosing_headers(prefix, window_start, lang) + prefix[window_start:]
    state = prefix_state(prefix, lang).key()
    return prefix_window, suffix_window, len(suffix_window) == len(suffix), state


def _is_code_line(line: str, lang: Language) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith((lang.line_comment, "#", "/*", "*"))


def _error_nodes(root) -> list:
    """ERROR and MISSING nodes, outermost ones only, visiting only subtrees that have errors."""
    found, stack = [], [root]
    while stack:
        node = stack.pop()
        if node.is_error or node.is_missing:
            found.append(node)
        elif node.has_error:
            stack.extend(node.children)
    return found


def _rows(node) -> range:
    return range(node.start_point.row, node.end_point.row + 1)


def _suffix_scan(base: _Baseline, state: ScanState, lang: Language) -> _SuffixScan:
    """Scan the suffix window from the state after a candidate (memoised by that state)."""
    key = state.key()
    found = base.suffix_scans.get(key)
    if found is None:
        end = scan_brackets(base.suffix_window, lang, state.copy())[0]
        errors = end.errors + (end.string is not None)
        found = base.suffix_scans[key] = _SuffixScan(errors, end.low, _closing_tail(end, lang))
    return found


def _closing_tail(end: ScanState, lang: Language) -> bytes:
    """Closers for the brackets still open where the window ends: tree-sitter recovers from a
    class left open at the end of its input by making the whole class one ERROR."""
    if not end.stack:
        return b""
    tail = end.string or ""  # a line comment ends at the newline below
    if end.comment == "block" and lang.block_comment:
        tail = lang.block_comment[1]
    closer = {open_: close for open_, close in lang.brackets}
    return (tail + "\n" + "".join(closer[open_] for open_ in reversed(end.stack))).encode()


def _bracket_problems(base: _Baseline, state: ScanState, scan: _SuffixScan) -> int:
    """Brackets the candidate breaks, given the scan state after it and the suffix scan."""
    if scan.errors != base.suffix_errors:  # stray and mismatched closers decide
        return max(0, scan.errors - base.suffix_errors)
    # Brackets the candidate opened and nothing in the window closed. A `{` may close beyond
    # a window cut mid-file (a class), so only at the end of the file; `(` and `[` rarely do.
    # state.low: the prefix brackets the candidate left alone; the rest of the stack is its own
    opened = state.stack[state.low : min(scan.low, len(state.stack))]
    return sum(1 for b in opened if base.suffix_is_whole or b in "([")


# per (language, document), the last window parsed and its tree: the document's next
# keystroke's window differs from it by what was typed, and tree-sitter reparses only what
# that edit touched. Per document: a replica's rerank worker checks many typists' windows
# in turn, and one typist's last window would be another's (measured on an H200 host, 32
# typists through 4 workers: the workers' time a request 5.9-6.5 ms p50 with one window per
# language, each a fresh parse of ~7k characters; 4.0 ms per document). Callers that name no
# document share one per language.
_LAST_WINDOWS: OrderedDict[tuple[str, str | None], tuple[bytes, object]] = OrderedDict()
_LAST_LOCK = threading.Lock()
LAST_WINDOWS_KEPT = 128  # documents whose last window's tree is kept (a few kB of text and its tree each)
REPARSE_SHARED = 0.5  # reparse from the last window when at least this share of the new one is unchanged


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return int(np.argmax(np.frombuffer(a, np.uint8, n) != np.frombuffer(b, np.uint8, n)))


def _common_suffix(a: bytes, b: bytes, limit: int) -> int:
    """The length of the longest common tail of a and b, at most limit."""
    if limit <= 0:
        return 0
    x, y = np.frombuffer(a, np.uint8)[-limit:][::-1], np.frombuffer(b, np.uint8)[-limit:][::-1]
    differ = x != y
    return limit if not differ.any() else int(np.argmax(differ))


def _point(text: bytes, offset: int) -> tuple[int, int]:
    """The (row, byte column) of a byte offset."""
    return text.count(b"\n", 0, offset), offset - (text.rfind(b"\n", 0, offset) + 1)


def forget_windows() -> None:
    """Drop the last windows' trees (the next parse of each language is a fresh one)."""
    with _LAST_LOCK:
        _LAST_WINDOWS.clear()


def _parse_window(lang: Language, document: bytes, doc: str | None = None):
    """The window's tree: an incremental reparse of the last window of this language and
    document (`doc`, any key naming it) when most of it is unchanged (one keystroke apart,
    the edit is what was typed), else a fresh parse. tree-sitter's reparse gives the tree
    a fresh parse would."""
    key = (lang.id, doc)
    with _LAST_LOCK:
        last = _LAST_WINDOWS.get(key)
    old_tree = None
    if last is not None:
        old, tree = last
        p = _common_prefix(old, document)
        s = _common_suffix(old, document, min(len(old), len(document)) - p)
        if old == document:
            return tree
        if p + s >= REPARSE_SHARED * len(document):
            old_tree = tree.copy()
            old_tree.edit(p, len(old) - s, len(document) - s, _point(old, p), _point(old, len(old) - s),
                          _point(document, len(document) - s))
    parser = parser_for(lang)
    tree = parser.parse(document, old_tree) if old_tree is not None else parser.parse(document)
    with _LAST_LOCK:
        _LAST_WINDOWS[key] = (document, tree)
        _LAST_WINDOWS.move_to_end(key)
        while len(_LAST_WINDOWS) > LAST_WINDOWS_KEPT:
            _LAST_WINDOWS.popitem(last=False)
    return tree


@functools.lru_cache(maxsize=8)
def _baseline(
    lang: Language, prefix_window: str, suffix_window: str, suffix_is_whole: bool, state_key: tuple,
    doc: str | None = None,
) -> _Baseline:
    stack, string, comment, errors = state_key
    state = ScanState(list(stack), string, comment, errors)
    prefix_bytes = prefix_window.encode()
    base = _Baseline(
        tree=None,
        prefix_bytes=prefix_bytes,
        suffix_bytes=suffix_window.encode(),
        tail=b"",
        suffix_is_whole=suffix_is_whole,
        cursor_row=prefix_bytes.count(b"\n"),
        cursor_column=len(prefix_bytes) - (prefix_bytes.rfind(b"\n") + 1),
        error_rows=frozenset(),
        prefix_state=state,
        suffix_window=suffix_window,
        suffix_errors=0,
    )
    scan = _suffix_scan(base, state, lang)
    base.suffix_errors, base.tail = scan.errors, scan.tail
    base.tree = _parse_window(lang, prefix_bytes + base.suffix_bytes + base.tail, doc)
    error_rows: set[int] = set()
    for node in _error_nodes(base.tree.root_node):
        error_rows.update(_rows(node))
    base.error_rows = frozenset(error_rows)
    return base


def _end_point(start: tuple[int, int], text: bytes) -> tuple[int, int]:
    """The (row, byte column) where text ends if it starts at start."""
    newlines = text.count(b"\n")
    if not newlines:
        return start[0], start[1] + len(text)
    return start[0] + newlines, len(text) - text.rfind(b"\n") - 1


def _is_incomplete(text: str, base: _Baseline, lang: Language, end: ScanState) -> bool:
    """The candidate stops mid-construct where the suffix does not go on with it: a dangling
    operator, a block header with no body, a string it opened."""
    suffix = base.suffix_window
    newline = suffix.find("\n")
    if (suffix if newline < 0 else suffix[:newline]).strip() or end.comment is not None:
        return False
    if not text.strip():
        return False
    if end.string is not None:
        return base.prefix_state.string is None
    last_line = text[text.rfind("\n") + 1 :]
    if "\n" not in text:
        last_line = base.prefix_bytes[base.prefix_bytes.rfind(b"\n") + 1 :].decode() + text
    next_line = next((line for line in suffix[newline + 1 :].split("\n", 20) if line.strip()), "")
    if newline >= 0 and indent_width(next_line) > indent_width(last_line):
        return False  # the next line continues the statement or fills the block
    last = code_part(last_line, lang).rstrip()
    if not last:
        return False
    if last.endswith(_CONTINUATION_ENDINGS) and not last.endswith(_COMPLETE_ENDINGS):
        return True
    return lang.block_style == "indent" and bool(_PY_BLOCK_HEADER.match(last))


def _row_before_edit(row: int, first_row: int, last_row: int) -> int:
    """A row of the edited window as a row of the window without the candidate (-1: fresh)."""
    if row <= first_row:
        return row
    if row == last_row:
        return first_row  # the candidate's last line ends with the rest of the cursor line
    return row - (last_row - first_row) if row > last_row else -1


def syntax_report(prefix: str, text: str, suffix: str, lang: Language) -> SyntaxReport:
    """Parse the window around the cursor with text inserted; count what text breaks."""
    return _report(_baseline(lang, *_window_texts(prefix, suffix, lang)), text, lang)


def syntax_reports(prefix: str, suffix: str, lang: Language, texts: list[str], doc: str | None = None
                   ) -> list[SyntaxReport]:
    """syntax_report of each text at one cursor (the window parsed once for all; doc: a key
    naming the document, whose last window's tree the parse starts from)."""
    if not texts:
        return []
    return window_reports(lang, window_texts(prefix, suffix, lang), texts, doc)


def window_texts(prefix: str, suffix: str, lang: Language) -> tuple[str, str, bool, tuple]:
    """What the checks read of the document at this cursor (a few kB of a file of any
    size): the text parsed before and after the cursor, whether the latter is the whole
    suffix, the bracket state at the cursor. window_reports needs nothing else."""
    return _window_texts(prefix, suffix, lang)


def window_reports(lang: Language, windows: tuple[str, str, bool, tuple], texts: list[str], doc: str | None = None
                   ) -> list[SyntaxReport]:
    """syntax_reports from window_texts' answer."""
    base = _baseline(lang, *windows, doc)
    return [_report(base, text, lang) for text in texts]


def _report(base: _Baseline, text: str, lang: Language) -> SyntaxReport:
    state = scan_brackets(text, lang, base.prefix_state.copy())[0]
    scan = _suffix_scan(base, state, lang)
    text_bytes = text.encode()
    # two edits to the baseline tree: the candidate at the cursor, and the closing tail
    # rewritten for the brackets open after it; then an incremental reparse
    edited = base.tree.copy()
    cursor_byte = len(base.prefix_bytes)
    cursor = (base.cursor_row, base.cursor_column)
    text_end = cursor_byte + len(text_bytes)
    text_end_point = _end_point(cursor, text_bytes)
    edited.edit(cursor_byte, cursor_byte, text_end, cursor, cursor, text_end_point)
    tail_start = text_end + len(base.suffix_bytes)
    tail_point = _end_point(text_end_point, base.suffix_bytes)
    edited.edit(
        tail_start,
        tail_start + len(base.tail),
        tail_start + len(scan.tail),
        tail_point,
        _end_point(tail_point, base.tail),
        _end_point(tail_point, scan.tail),
    )
    document = base.prefix_bytes + text_bytes + base.suffix_bytes + scan.tail
    tree = parser_for(lang).parse(document, edited)
    new_rows = text_bytes.count(b"\n")

    # A node is old if, on every row of the edited region it touches, the document without
    # the candidate already had an error; rows strictly inside a multi-line candidate are fresh.
    # Far from the edit, error recovery reshuffles by itself (and the bracket check sees real
    # damage), so rows outside the region are not compared.
    first_row, last_row = base.cursor_row, base.cursor_row + new_rows
    region_end = last_row + CONTEXT_ROWS
    new_errors = new_missing = 0
    for node in _error_nodes(tree.root_node):
        start_row, end_row = node.start_point.row, node.end_point.row
        if end_row < first_row or start_row > region_end or node.start_byte >= tail_start:
            continue  # away from the edit, or in the closing tail we added
        if node.is_missing:
            inside = cursor_byte < node.start_byte < text_end
        else:
            inside = cursor_byte <= node.start_byte and node.end_byte <= text_end
        old = not inside and all(
            _row_before_edit(row, first_row, last_row) in base.error_rows
            for row in range(max(start_row, first_row), min(end_row, region_end) + 1)
        )
        if not old:
            if node.is_missing:
                new_missing += 1
            else:
                new_errors += 1

    unbalanced = _bracket_problems(base, state, scan)
    incomplete = _is_incomplete(text, base, lang, state)
    ok = not (new_errors or new_missing or unbalanced or incomplete)
    return SyntaxReport(ok, new_errors, new_missing, unbalanced, incomplete)


def syntax_penalty(report: SyntaxReport) -> float:
    """The (positive) penalty for a report, before SYNTAX_WEIGHT."""
    nodes = min(MAX_COUNTED_NODES, report.new_error_nodes + report.new_missing_nodes)
    brackets = min(MAX_COUNTED_NODES, report.unbalanced_brackets)
    return (
        ERROR_NODE_PENALTY * nodes
        + BRACKET_PENALTY * brackets
        + INCOMPLETE_PENALTY * report.incomplete
    )


def rerank(
    candidates: list[Candidate],
    prefix: str,
    suffix: str,
    lang: Language | None,
    syntax_weight: float = SYNTAX_WEIGHT,
    length_weight: float = LENGTH_WEIGHT,
    reports: list[SyntaxReport] | None = None,
    doc: str | None = None,
) -> list[Candidate]:
    """Score = mean log-prob - syntax penalty + length bonus; best first (stable).
    reports: the candidates' syntax reports, made elsewhere (a RerankPool's processes);
    None: made here (doc: the document's key, see syntax_reports)."""
    if lang is None or not candidates:
        reports = None
    elif reports is None:
        reports = syntax_reports(prefix, suffix, lang, [c.text for c in candidates], doc)
    elif len(reports) != len(candidates):
        raise ValueError(f"{len(reports)} syntax reports for {len(candidates)} candidates")
    ranked = []
    for i, cand in enumerate(candidates):
        parts = {"logprob": cand.logprob}
        syntax_ok = True
        if reports is not None:
            report = reports[i]
            syntax_ok = report.ok
            parts["syntax"] = -syntax_weight * syntax_penalty(report)
            parts["length"] = length_weight * math.log1p(len(cand.text.strip()))
        ranked.append(
            dataclasses.replace(
                cand, score=sum(parts.values()), syntax_ok=syntax_ok, score_parts=parts
            )
        )
    ranked.sort(key=lambda c: -c.score)
    return ranked


def measure_rerank_ms(document: str, lang: Language, positions: int = 30, seed: int = 0) -> dict:
    """Time syntax_report at random mid-line cursors of a real file (for `codecomplete bench`).

    At each cursor the true rest of the line is one candidate and three damaged copies are
    the others. Returns milliseconds for the first candidate of a request (it parses the
    window) and for each further one, as CPU time of this thread (wall time suffers from
    other processes), and how often the true rest passes and a damaged copy is flagged; and
    the first candidate's on the keystroke after (one more character typed: the window is
    reparsed from the last one's tree)."""
    import random  # bench-only imports stay here: statistics alone costs ~10 ms at start-up
    import statistics

    rng = random.Random(seed)
    lines = document.split("\n")
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line) + 1)
    rows = [r for r, line in enumerate(lines) if len(line.strip()) >= 12]
    first_ms, next_ms, wall_ms, typed_ms = [], [], [], []
    true_ok = damaged_flagged = damaged = 0
    for row in rng.sample(rows, min(positions, len(rows))):
        line = lines[row]
        indent = len(line) - len(line.lstrip())
        cut = rng.randint(indent + 2, len(line) - 2)
        prefix, rest = document[: starts[row] + cut], line[cut:]
        suffix = document[starts[row] + len(line) :]
        _baseline.cache_clear()
        _window_texts.cache_clear()
        forget_windows()
        spaced = rest.replace(" ", " x ", 1) if " " in rest else rest + " x"
        damaged_copies = [rest + ")", rest[:-1], spaced]
        for i, text in enumerate([rest, *damaged_copies]):
            cpu, wall = time.thread_time(), time.perf_counter()
            report = syntax_report(prefix, text, suffix, lang)
            (first_ms if i == 0 else next_ms).append((time.thread_time() - cpu) * 1e3)
            wall_ms.append((time.perf_counter() - wall) * 1e3)
            if i == 0:
                true_ok += report.ok
            elif text != rest:
                damaged += 1
                damaged_flagged += not report.ok
        # the next keystroke: one more character typed, its window reparsed from this one's tree
        _baseline.cache_clear()
        _window_texts.cache_clear()
        cpu = time.thread_time()
        syntax_report(prefix + rest[0], rest[1:], suffix, lang)
        typed_ms.append((time.thread_time() - cpu) * 1e3)
    next_ms.sort()

    def median(values: list[float]) -> float | None:
        return round(statistics.median(values), 3) if values else None

    return {
        "language": lang.id,
        "lines": len(lines),
        "cursors": len(first_ms),
        "first_candidate_cpu_ms_median": median(first_ms),
        # the first candidate one keystroke later (the window reparsed from the last tree)
        "typed_first_candidate_cpu_ms_median": median(typed_ms),
        "first_over_typed": round(statistics.median(first_ms) / max(1e-6, statistics.median(typed_ms)), 2)
        if typed_ms else None,
        "per_candidate_cpu_ms_median": median(next_ms),
        "per_candidate_cpu_ms_p90": round(next_ms[int(0.9 * len(next_ms))], 3) if next_ms else None,
        "wall_ms_median": median(wall_ms),
        "true_rest_ok": true_ok,
        "damaged_flagged": damaged_flagged,
        "damaged": damaged,
    }
