"""Held-out loss of a model on source files: mean next-token loss (nats) and bits per byte.

    python -m codecomplete.models.evaluate_loss PATH... [--model DIR] [--json]

Files are tokenized whole, cut into windows of the model's context, and scored with the
torch model (the same weights the runtimes load). Used for MODEL.md's held-out figures on
the development split of shared/HOLDOUT.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def iter_files(paths: list[str], suffix: str = ".py"):
    for p in paths:
        path = Path(p)
        if path.is_dir():
            yield from sorted(x for x in path.rglob(f"*{suffix}") if x.is_file())
        elif path.is_file():
            yield path


def evaluate(model_path: str | None, paths: list[str], window: int = 0, limit_files: int = 0) -> dict:
    from codecomplete.models.format.source import load_model_source
    from codecomplete.runtime.torch import build_torch_model

    source = load_model_source(model_path)
    result = evaluate_model(build_torch_model(source), source.tokenizer, paths, window, limit_files)
    return {"model": model_path or "default", **result}


def evaluate_model(model, tokenizer, paths: list[str], window: int = 0, limit_files: int = 0) -> dict:
    """Held-out loss of a models.model.Transformer (any device) with its tokenizer."""
    import torch
    import torch.nn.functional as F

    cfg = model.cfg
    device = next(model.parameters()).device
    window = window or cfg.max_seq_len
    eos = cfg.eos_ids[0] if cfg.eos_ids else None
    total_nats = total_tokens = total_bytes = files = 0
    for path in iter_files(paths):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        ids = tokenizer.encode(text) + ([eos] if eos is not None else [])
        if len(ids) < 2:
            continue
        with torch.inference_mode():
            for start in range(0, len(ids) - 1, window):
                chunk = torch.tensor(ids[start : start + window + 1], device=device)[None]
                logits = model(chunk[:, :-1])
                loss = F.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum")
                total_nats += float(loss)
                total_tokens += chunk.shape[1] - 1
        total_bytes += len(text.encode("utf-8"))
        files += 1
        if limit_files and files >= limit_files:
            break
    return {"files": files, "tokens": total_tokens, "bytes": total_bytes,
            "loss_nats_per_token": total_nats / max(1, total_tokens),
            "bits_per_byte": total_nats / math.log(2) / max(1, total_bytes)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--model", default=None)
    ap.add_argument("--window", type=int, default=0)
    ap.add_argument("--limit-files", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    result = evaluate(args.model, args.paths, args.window, args.limit_files)
    json.dump(result, sys.stdout, indent=None if args.json else 2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
