"""HumanEval infilling (Bavarian et al. 2022): prefix and suffix in, middle out, judged by the tests."""

from __future__ import annotations

from pathlib import Path

from codecomplete.eval.data import read_jsonl, subsample
from codecomplete.eval.programs import Program, build_program
from codecomplete.eval.runner import Case, insertion_text
from codecomplete.request import Candidate, CompletionOptions, CompletionRequest

BENCHMARK_FILES = {
    "single-line": "HumanEval-SingleLineInfilling.jsonl.gz",
    "multi-line": "HumanEval-MultiLineInfilling.jsonl.gz",
    "random-span": "HumanEval-RandomSpanInfilling.jsonl.gz",
    "random-span-light": "HumanEval-RandomSpanInfillingLight.jsonl.gz",
}
WHOLE_LINE_BENCHMARKS = ("single-line", "multi-line")


def load_cases(data_dir: Path, benchmark: str, options: CompletionOptions, limit: int | None = None, seed: int = 0) -> list[Case]:
    """The benchmark's problems (a seeded subset when limit is set) as engine requests."""
    records = subsample(read_jsonl(data_dir / "human-eval-infilling" / BENCHMARK_FILES[benchmark]), limit, seed)
    return [case_for(record, options, whole_lines=benchmark in WHOLE_LINE_BENCHMARKS) for record in records]


def case_for(record: dict, options: CompletionOptions, whole_lines: bool = False) -> Case:
    """The document is prompt + suffix with the cursor between them."""
    prompt, suffix = record["prompt"], record["suffix"]
    request = CompletionRequest(text=prompt + suffix, offset=len(prompt), language="python", path="solution.py", options=options)
    return Case(record["task_id"], request, record["canonical_solution"], "python",
                {**record, "whole_lines": whole_lines})


def program_source(case: Case, candidate: Candidate) -> str:
    """prompt + middle + suffix, then the tests and the call that runs them."""
    record = case.problem
    middle, suffix = insertion_text(case, candidate)
    if record.get("whole_lines") and middle and not middle.endswith("\n") and case.request.prefix.endswith("\n"):
        middle += "\n"  # whole lines are infilled: the suffix starts a new line
    return f"{case.request.prefix}{middle}{suffix}\n\n{record['test']}\n\ncheck({record['entry_point']})\n"


def program_of(case: Case, candidate: Candidate) -> Program:
    return build_program("python", program_source(case, candidate))
