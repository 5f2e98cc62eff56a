"""Left-to-right pass@k on Multilingual HumanEval and MBXP (the mxeval problem files)."""

from __future__ import annotations

import json
from pathlib import Path

from codecomplete.eval.data import DataError, read_jsonl, subsample
from codecomplete.eval.programs import Program, build_program, left_to_right_source
from codecomplete.eval.runner import Case
from codecomplete.request import Candidate, CompletionOptions, CompletionRequest

DATASET_DIRS = {"humaneval": "multilingual_humaneval", "mbxp": "mbxp"}
LANGUAGES = ("python", "javascript", "java", "go", "typescript")
SOURCE_NAME = {"python": "main.py", "javascript": "main.js", "java": "Main.java", "go": "main.go", "typescript": "main.ts"}


def data_file(data_dir: Path, dataset: str, language: str) -> Path:
    """The problem file for a language, as the folder's metadata.json names it."""
    folder = data_dir / "mxeval" / DATASET_DIRS[dataset]
    try:
        names = json.loads((folder / "metadata.json").read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {folder / 'metadata.json'}: {e}") from e
    if language not in names:
        raise DataError(f"{dataset} has no {language} problems (it has {', '.join(sorted(names))})")
    return folder / names[language]


def load_cases(data_dir: Path, dataset: str, language: str, options: CompletionOptions,
               limit: int | None = None, seed: int = 0, need_reference: bool = False) -> list[Case]:
    """Requests with the prompt as the document; with need_reference, only problems that ship a solution."""
    records = read_jsonl(data_file(data_dir, dataset, language))
    if need_reference:
        records = [r for r in records if r.get("canonical_solution")]
    return [case_for(record, language, options) for record in subsample(records, limit, seed)]


def case_for(record: dict, language: str, options: CompletionOptions) -> Case:
    prompt = record["prompt"]
    request = CompletionRequest(text=prompt, offset=len(prompt), language=language, path=SOURCE_NAME[language], options=options)
    return Case(record["task_id"], request, record.get("canonical_solution") or "", language, record)


def program_source(case: Case, completion: str) -> str:
    record = case.problem
    return left_to_right_source(case.language, case.request.prefix, completion, record["test"], record["entry_point"])


def program_of(case: Case, candidate: Candidate) -> Program:
    return build_program(case.language, program_source(case, candidate.text))
