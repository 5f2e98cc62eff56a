"""Where the evaluation sets live and how to read them (JSON lines, maybe gzipped)."""

from __future__ import annotations

import gzip
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

DATA_ENV = "CODECOMPLETE_DATA"
REPO_ROOT = Path(__file__).resolve().parents[2]

T = TypeVar("T")


class DataError(Exception):
    """An evaluation set is missing or malformed; the message says what to do."""


def resolve_data_dir(explicit: str | None = None) -> Path:
    """--data-dir, else $CODECOMPLETE_DATA, else ../shared/data beside the cwd or the repository."""
    if explicit:
        path = Path(explicit)
        if not path.is_dir():
            raise DataError(f"--data-dir {explicit}: not a directory")
        return path
    if os.environ.get(DATA_ENV):
        path = Path(os.environ[DATA_ENV])
        if not path.is_dir():
            raise DataError(f"${DATA_ENV}={path}: not a directory")
        return path
    for base in (Path.cwd(), REPO_ROOT):
        path = base.parent / "shared" / "data"
        if path.is_dir():
            return path
    raise DataError(f"no evaluation data: pass --data-dir or set ${DATA_ENV} (expected ../shared/data)")


def read_jsonl(path: Path) -> list[dict]:
    """All records of a .jsonl or .jsonl.gz file."""
    if not path.is_file():
        raise DataError(f"missing data file {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def subsample(items: Sequence[T], limit: int | None, seed: int) -> list[T]:
    """At most limit items, drawn with the seed, kept in their original order."""
    if limit is None or limit >= len(items):
        return list(items)
    chosen = sorted(random.Random(seed).sample(range(len(items)), max(limit, 0)))
    return [items[i] for i in chosen]
