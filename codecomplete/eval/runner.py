"""What every evaluation shares: cases, calling the engine, running programs, progress, output."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from codecomplete.eval.metrics import latency_summary, mean, pass_at_k_summary
from codecomplete.eval.programs import Program
from codecomplete.eval.sandbox import RunResult, Sandbox
from codecomplete.request import Candidate, Completion, CompletionRequest


class EngineLike(Protocol):
    """The method of codecomplete.engine.Engine the harness needs; an engine that keeps state
    between requests also has `forget()`, called before each case."""

    def complete(self, request: CompletionRequest) -> Completion: ...


@dataclass
class Case:
    """One evaluation item: the request sent to the engine and what a right answer looks like."""

    task_id: str
    request: CompletionRequest
    reference: str  # the dataset's own insertion (canonical middle, solution or rest of line)
    language: str
    problem: dict = field(default_factory=dict)  # the raw record, for building programs


@dataclass
class Generated:
    """The engine's answer to one case, with what it cost."""

    candidates: list[Candidate]
    tokens_generated: int = 0
    model_calls: int = 0
    latency_ms: float = 0.0
    timings_ms: dict = field(default_factory=dict)
    error: str = ""


class ReferenceEngine:
    """Answers each case with the dataset's own solution: checks the harness and the toolchains."""

    def __init__(self, cases: Sequence[Case]):
        self._answers = {id(case.request): case.reference for case in cases}

    def complete(self, request: CompletionRequest) -> Completion:
        return Completion(candidates=[Candidate(text=self._answers[id(request)])])


class Progress:
    """A progress bar on stderr (a line per tenth when stderr is not a terminal)."""

    def __init__(self, total: int, label: str, enabled: bool = True, stream=None):
        self.total, self.label, self.enabled = total, label, enabled and total > 0
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_tenth = -1
        self._lock = threading.Lock()

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            if self.enabled:
                self._draw()

    def _draw(self) -> None:
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        if self._tty:
            filled = int(30 * self.done / self.total)
            bar = "#" * filled + "." * (30 - filled)
            self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {rate:.1f}/s")
            if self.done >= self.total:
                self.stream.write("\n")
        else:
            tenth = 10 * self.done // self.total
            if tenth != self._last_tenth:
                self._last_tenth = tenth
                self.stream.write(f"{self.label}: {self.done}/{self.total} ({rate:.1f}/s)\n")
        self.stream.flush()


def generate_all(engine: EngineLike, cases: Sequence[Case], show_progress: bool = True) -> list[Generated]:
    """Run the engine on every case in order; an engine error is recorded, reported once, and scored as a miss."""
    progress = Progress(len(cases), "generate", show_progress)
    complete_all = getattr(engine, "complete_all", None)
    if complete_all is not None:  # several model processes (eval/parallel.py)
        return complete_all(cases, progress)
    out = []
    reported = False
    forget = getattr(engine, "forget", None)
    for case in cases:
        if forget is not None:
            forget()  # each case stands alone: the same answers in any order or on any worker
        start = time.perf_counter()
        try:
            completion = engine.complete(case.request)
        except Exception as e:  # keep a long run going; the count shows in the result
            if not reported:
                print(f"engine error on {case.task_id}: {type(e).__name__}: {e}", file=sys.stderr)
                reported = True
            out.append(Generated([], latency_ms=(time.perf_counter() - start) * 1000.0, error=f"{type(e).__name__}: {e}"))
        else:
            out.append(Generated(
                list(completion.candidates), completion.tokens_generated, completion.model_calls,
                (time.perf_counter() - start) * 1000.0, dict(completion.timings_ms),
            ))
        progress.advance()
    return out


def execute_all(programs: Sequence[Program], jobs: int = 2, show_progress: bool = True,
                sandbox: Sandbox | None = None) -> list[RunResult]:
    """Run programs in the sandbox, jobs at a time; results in input order."""
    if not programs:
        return []
    sandbox = sandbox or Sandbox()
    progress = Progress(len(programs), "execute", show_progress)

    def run_one(program: Program) -> RunResult:
        result = sandbox.run(program.argv, files=program.files, limits=program.limits)
        progress.advance()
        return result

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(run_one, programs))


def cost_summary(generated: Sequence[Generated]) -> dict:
    """Budget columns: tokens generated and model calls (total and per case), latency, engine errors."""
    cases = max(len(generated), 1)
    tokens = sum(g.tokens_generated for g in generated)
    calls = sum(g.model_calls for g in generated)
    return {
        "tokens_generated": tokens,
        "tokens_generated_per_case": tokens / cases,
        "model_calls": calls,
        "model_calls_per_case": calls / cases,
        **latency_summary([g.latency_ms for g in generated]),
        "engine_errors": sum(1 for g in generated if g.error),
    }


def insertion_text(case: Case, candidate: Candidate) -> tuple[str, str]:
    """(text inserted at the cursor, the document's suffix after it): the engine has already
    dropped what a candidate retyped of the suffix, so the suffix stays whole."""
    return candidate.text, case.request.suffix


def run_execution_benchmark(
    engine: EngineLike,
    cases: Sequence[Case],
    program_of: Callable[[Case, Candidate], Program],
    samples: int = 1,
    jobs: int = 2,
    show_progress: bool = True,
    sandbox: Sandbox | None = None,
    extra_case_fields: Callable[[Case, Generated], dict] | None = None,
) -> tuple[dict, list[dict]]:
    """Generate, build a program per candidate (top `samples`), execute, score.

    `pass@1` is the top-ranked candidate's pass rate: what the user would get. With
    samples > 1, `pass@k` (k >= 2) and `pass@1_sampled` use the unbiased estimator over all
    candidates returned (the engine deduplicates, so a problem may have fewer than asked).
    """
    generated = generate_all(engine, cases, show_progress)
    programs, owners = [], []
    for index, (case, gen) in enumerate(zip(cases, generated, strict=True)):
        for candidate in gen.candidates[:samples]:
            programs.append(program_of(case, candidate))
            owners.append(index)
    results = execute_all(programs, jobs, show_progress, sandbox)
    per_case: list[list[RunResult]] = [[] for _ in cases]
    for owner, result in zip(owners, results, strict=True):
        per_case[owner].append(result)
    passes = [[r.passed for r in rs] for rs in per_case]
    details = []
    for case, gen, rs in zip(cases, generated, per_case, strict=True):
        top = rs[0] if rs else None
        record = {
            "task_id": case.task_id,
            "passed": bool(top and top.passed),
            "candidates": len(rs),
            "candidates_passed": sum(r.passed for r in rs),
            "completion": gen.candidates[0].text if gen.candidates else None,
            "tokens_generated": gen.tokens_generated,
            "model_calls": gen.model_calls,
            "latency_ms": round(gen.latency_ms, 3),
        }
        if top is not None and not top.passed:
            record["failure"] = "timeout" if top.timed_out else _excerpt(top.stderr or top.stdout)
        if gen.error:
            record["engine_error"] = gen.error
        if extra_case_fields:
            record.update(extra_case_fields(case, gen))
        details.append(record)
    metrics = {"pass@1": mean(bool(p and p[0]) for p in passes) if cases else float("nan")}
    if samples > 1:
        sampled = pass_at_k_summary([p if p else [False] for p in passes])
        metrics["pass@1_sampled"] = sampled.pop("pass@1", float("nan"))
        metrics.update(sampled)
    metrics["sandbox_errors"] = sum(1 for r in results if r.sandbox_error)
    metrics.update(cost_summary(generated))
    return metrics, details


def _excerpt(text: str, chars: int = 300) -> str:
    """Head and tail of a long output (the error is at the top for node, at the bottom for Python)."""
    return text if len(text) <= 2 * chars else f"{text[:chars]}\n[...]\n{text[-chars:]}"


def make_result(benchmark: str, settings: dict, metrics: dict, details: list[dict]) -> dict:
    """The one JSON object an eval command prints."""
    return {"benchmark": benchmark, "settings": settings, "cases": len(details), **metrics, "details": details}


def _clean(value):
    """NaN and infinities become null so the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def to_json(result: dict) -> str:
    return json.dumps(_clean(result), indent=2, ensure_ascii=False)


def summary_text(result: dict) -> str:
    """The metrics of a result as aligned `name  value` lines (no per-case details)."""
    rows = [("benchmark", result["benchmark"]), ("cases", result["cases"])]
    rows += [(k, v) for k, v in result.items() if k not in ("benchmark", "settings", "cases", "details")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v:.4f}" if isinstance(v, float) else f"{k.ljust(width)}  {v}" for k, v in rows)
