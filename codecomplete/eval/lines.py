"""Line completion on real source files: cut a line at a sampled cursor, ask for the rest of it.

Cursor kinds: `mid-token` (inside an identifier, where token alignment matters),
`boundary` (between tokens, rest of the line non-blank) and `line-start` (after the
indentation of a non-blank line). The rest of the line is removed from the document,
so the engine sees the prefix, the cursor, and the following lines.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from codecomplete.eval.data import subsample
from codecomplete.eval.metrics import edit_similarity, mean, same_line
from codecomplete.eval.runner import Case, EngineLike, cost_summary, generate_all
from codecomplete.languages import language_for
from codecomplete.request import CompletionOptions, CompletionRequest
from codecomplete.text import indent_of, is_word_char

CURSOR_KINDS = ("mid-token", "boundary", "line-start")
SKIP_DIRS = {".git", ".hg", ".svn", "node_modules", "__pycache__", ".venv", "venv", ".tox", "build", "dist", "target"}
MAX_FILE_BYTES = 512 * 1024
MAX_LINE_CHARS = 300
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")


def source_files(paths: Iterable[str]) -> list[tuple[Path, str]]:
    """(file, workspace-relative name) under the given paths, directories walked in sorted order,
    keeping files whose extension names a known language."""
    found = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            candidates = [(path, path.name)]
        else:
            candidates = []
            root = path.resolve()
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
                here = Path(dirpath).resolve()
                for name in sorted(filenames):
                    candidates.append((Path(dirpath) / name, os.path.relpath(here / name, root.parent)))
        found += [(p, name) for p, name in candidates if language_for("", str(p)) is not None]
    return found


def read_source(path: Path) -> str | None:
    """The file as text, or None when it is too big, binary or not UTF-8."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _lines(text: str):
    """(start, content_start, end) of each line; end excludes the newline."""
    start = 0
    while start <= len(text):
        end = text.find("\n", start)
        end = len(text) if end == -1 else end
        line = text[start:end]
        yield start, start + len(indent_of(line)), end
        if end == len(text):
            break
        start = end + 1


def cursor_positions(text: str, kind: str, rng: random.Random) -> list[int]:
    """Candidate cursor offsets of one kind in text (one per identifier for mid-token)."""
    positions = []
    for start, content, end in _lines(text):
        if content >= end or end - start > MAX_LINE_CHARS or not text[content:end].strip():
            continue
        if kind == "line-start":
            positions.append(content)
        elif kind == "mid-token":
            for match in _WORD.finditer(text, content, end):
                positions.append(rng.randrange(match.start() + 1, match.end()))
        elif kind == "boundary":
            for p in range(content + 1, end):
                if not text[p:end].strip():
                    break
                before, after = text[p - 1], text[p]
                if is_word_char(before) and is_word_char(after):
                    continue
                if before.isspace() and after.isspace():
                    continue
                positions.append(p)
        else:
            raise ValueError(f"unknown cursor kind {kind!r}")
    return positions


def make_case(text: str, offset: int, path: str, language_id: str, options: CompletionOptions) -> Case:
    """Remove the rest of the line after offset; that rest is the reference."""
    end = text.find("\n", offset)
    end = len(text) if end == -1 else end
    document = text[:offset] + text[end:]
    request = CompletionRequest(text=document, offset=offset, language=language_id, path=path, options=options)
    return Case(f"{path}:{offset}", request, text[offset:end], language_id)


def load_cases(paths: Sequence[str], kind: str, options: CompletionOptions, per_file: int = 5,
               limit: int | None = None, seed: int = 0) -> list[Case]:
    """Up to per_file cursors of the kind from each file, then a seeded subset of at most limit."""
    rng = random.Random(seed)
    cases = []
    for path, name in source_files(paths):
        text = read_source(path)
        if text is None:
            continue
        lang = language_for("", name)
        positions = cursor_positions(text, kind, rng)
        chosen = sorted(rng.sample(positions, min(per_file, len(positions))))
        cases += [make_case(text, p, name, lang.language_ids[0], options) for p in chosen]
    return subsample(cases, limit, seed)


def syntax_error(prefix: str, inserted: str, suffix: str, language_id: str, reference: str) -> bool:
    """Does inserting the text break the parse around the cursor (new ERROR/MISSING nodes or brackets)?

    Judged by the reranker's syntax_report; where that report also faults the file's own
    line (e.g. a line opening a multi-line string), it is not trusted and the whole file is
    parsed with each instead: an error is more ERROR/MISSING nodes than the original has.
    """
    lang = language_for(language_id)
    if lang is None:
        return False
    try:
        from codecomplete.rerank import syntax_report
    except ImportError:
        syntax_report = None
    if syntax_report is not None and not _report_faults(syntax_report(prefix, reference, suffix, lang)):
        return _report_faults(syntax_report(prefix, inserted, suffix, lang))
    return _tree_sitter_errors(prefix + inserted + suffix, lang) > _tree_sitter_errors(prefix + reference + suffix, lang)


def _report_faults(report) -> bool:
    fields = ("new_error_nodes", "new_missing_nodes", "unbalanced_brackets")
    if all(hasattr(report, f) for f in fields):
        return any(getattr(report, f) for f in fields)  # "incomplete" is not an error: `if a:` is a fine line
    return not report.ok


def _tree_sitter_errors(text: str, lang) -> int:
    from codecomplete.languages import parser_for

    tree = parser_for(lang).parse(text.encode())
    count, stack = 0, [tree.root_node]
    while stack:
        node = stack.pop()
        if node.is_error or node.is_missing:
            count += 1
        stack.extend(node.children)
    return count


def score(cases: Sequence[Case], generated) -> tuple[dict, list[dict]]:
    """Exact match, edit similarity, syntax errors of the top candidate; the best-of-N oracle."""
    details = []
    for case, gen in zip(cases, generated, strict=True):
        target = case.reference
        lines = [c.text.split("\n", 1)[0] for c in gen.candidates]
        top = lines[0] if lines else ""
        record = {
            "task_id": case.task_id,
            "target": target,
            "completion": top,
            "exact_match": same_line(top, target),
            "edit_similarity": edit_similarity(top.rstrip(), target.rstrip()),
            "oracle_exact_match": any(same_line(line, target) for line in lines),
            "oracle_edit_similarity": max((edit_similarity(line.rstrip(), target.rstrip()) for line in lines), default=0.0),
            "candidates": len(lines),
            "tokens_generated": gen.tokens_generated,
            "model_calls": gen.model_calls,
            "latency_ms": round(gen.latency_ms, 3),
            "timings_ms": {k: round(v, 3) for k, v in gen.timings_ms.items()},  # the engine's stages
            # the ranked candidates with their score parts: rerank weights can be studied offline
            "ranked": [{"line": line, "logprob": round(c.logprob, 4),
                        "parts": {k: round(v, 4) for k, v in (c.score_parts or {}).items()}}
                       for line, c in zip(lines, gen.candidates, strict=True)],
        }
        if lines:
            record["syntax_error"] = syntax_error(case.request.prefix, top, case.request.suffix, case.language, target)
        if gen.error:
            record["engine_error"] = gen.error
        details.append(record)
    answered = [d for d in details if d["candidates"]]
    metrics = {
        "exact_match": mean(d["exact_match"] for d in details),
        "edit_similarity": mean(d["edit_similarity"] for d in details),
        "syntax_error_rate": mean(d["syntax_error"] for d in answered),
        "oracle_exact_match": mean(d["oracle_exact_match"] for d in details),
        "oracle_edit_similarity": mean(d["oracle_edit_similarity"] for d in details),
        "empty_rate": mean(not d["candidates"] or not d["completion"].strip() for d in details),
        "candidates_per_case": mean(d["candidates"] for d in details),
    }
    metrics.update(cost_summary(generated))
    return metrics, details


def evaluate(engine: EngineLike, cases: Sequence[Case], show_progress: bool = True) -> tuple[dict, list[dict]]:
    """Generate for every case, then score."""
    return score(cases, generate_all(engine, cases, show_progress))
