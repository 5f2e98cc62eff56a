"""The token-alignment paper's partial-token sets (perturbed MBXP): prompts that end inside a token.

Files: tokenalign/perturbed_mbxp_v2/{mbpp,mbjp,mbjsp}/{split}/{prefix}_{split}_sub_filter.jsonl
(cut mid-token; canonical_solution is the rest) and, for Python, *_full_filter.jsonl cut at
the matching token boundary (the baseline). Scored by execution (prompt + completion + test)
and by exact match of the first generated line against the canonical solution's first line.
"""

from __future__ import annotations

from pathlib import Path

from codecomplete.eval import mxeval
from codecomplete.eval.data import DataError, read_jsonl, subsample
from codecomplete.eval.metrics import same_first_line
from codecomplete.eval.runner import Case, Generated
from codecomplete.request import CompletionOptions

SPLITS = ("word", "punc", "space", "prefix-sep", "prefix-indent")
DATASET_PREFIX = {"python": "mbpp", "java": "mbjp", "javascript": "mbjsp"}


def data_file(data_dir: Path, language: str, split: str, baseline: bool = False) -> Path:
    """The sub-token file, or with baseline its unsplit (`full`) counterpart."""
    prefix = DATASET_PREFIX[language]
    kind = "full" if baseline else "sub"
    path = data_dir / "tokenalign" / "perturbed_mbxp_v2" / prefix / split / f"{prefix}_{split}_{kind}_filter.jsonl"
    if baseline and not path.is_file():
        raise DataError(f"no unsplit baseline for {language}/{split}: the paper's sets ship `full` files for Python only")
    return path


def load_cases(data_dir: Path, language: str, split: str, options: CompletionOptions, baseline: bool = False,
               limit: int | None = None, seed: int = 0) -> list[Case]:
    """Left-to-right requests: the document is the prompt, the cursor at its end."""
    records = subsample(read_jsonl(data_file(data_dir, language, split, baseline)), limit, seed)
    return [case_for(record, language, options) for record in records]


# Same shape as mxeval: the prompt is the document, prompt + completion + test the program.
case_for = mxeval.case_for
program_of = mxeval.program_of


def exact_match_fields(case: Case, gen: Generated) -> dict:
    """Per-case first-line exact match of the top candidate (and of any candidate: the oracle)."""
    texts = [c.text for c in gen.candidates]
    return {
        "exact_match": bool(texts) and same_first_line(texts[0], case.reference),
        "oracle_exact_match": any(same_first_line(t, case.reference) for t in texts),
    }
