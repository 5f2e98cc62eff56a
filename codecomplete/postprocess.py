"""Post-processing proper, on text the scope has already cut: repetition loops, text that
retypes what follows the cursor, trailing whitespace, empty candidates and duplicates.
Pure functions on strings."""

from __future__ import annotations

import dataclasses

from codecomplete.languages import Language
from codecomplete.lexer import SUFFIX_SCAN_CHARS, ScanState, prefix_state, scan_brackets
from codecomplete.request import Candidate
from codecomplete.scope import CompletionScope
from codecomplete.text import cursor_line_end, cursor_line_start, rest_of_line, start_of_line

MAX_PERIOD_CHARS = 40  # longest repeated unit cut_repetition looks for inside a line
MAX_PERIOD_LINES = 8  # longest repeated block of lines cut_repetition looks for
MIN_REPEATS_IN_LINE = 6  # a unit must repeat this often to the end to count as a loop


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
    newline = cursor_line_end(suffix)
    line_suffix = rest_of_line(suffix).rstrip()
    line_prefix = prefix[cursor_line_start(prefix) :]

    # the rest of the cursor line, or the start of it, retyped at the end of the completion
    if line_suffix:
        last_line_start = start_of_line(text, len(text))
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
    """Cut loops, drop suffix overlap, strip, drop empty and duplicates (the best log-probability
    of equal texts stays, in the first one's place). The texts are already cut to scope."""
    line_suffix = rest_of_line(suffix)
    kept: dict[str, int] = {}
    out: list[Candidate] = []
    for cand in cands:
        text = cut_repetition(cand.text)
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
