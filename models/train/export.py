"""A finished run as a model folder that `codecomplete --model DIR` loads, and pieces of it
small enough to come back from a GPU machine.

    python3 -m models.train.export --run RUN --out DIR [--precision int8|bf16] [--pieces PIECES --piece-mib 15]

DIR gets config.json, tokenizer.json, model.safetensors (int8 per output channel, or the
weights in bf16 for the int8-vs-float comparison) and MANIFEST.json: the corpus sources
(name, version, files, bytes), the held-out files dropped, the tokens, and what the run
was (teacher, steps, tokens, loss weights) from its train_log.jsonl. With --pieces, the
folder (and the run's logs) is also written as one tar split into pieces of at most
--piece-mib MiB plus JOIN.txt, the command that puts it back together.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np

from ..format.config import ModelConfig
from ..format.folder import param_shapes, read_safetensors, save_model_folder
from ..prune import BUDGET_BYTES

LOG_FILES = ("train_log.jsonl", "stdout.log")


def run_summary(run: Path) -> dict:
    """What a run was, from its log: start config, init line, schedule, last losses, end."""
    lines = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines() if x.strip()]
    start = next((x for x in lines if x.get("event") == "start"), {})
    conf = start.get("config", {})
    out = {key: conf.get(key) for key in ("teacher", "init", "baseline", "kl_weight", "top_k", "lr", "batch_size",
                                          "seq_len", "minutes", "follow") if key in conf}
    if conf.get("teacher"):
        out["teacher"] = Path(conf["teacher"]).name
    for name in ("init", "schedule", "end"):
        record = next((x for x in reversed(lines) if x.get("event") == name), None)
        if record:
            out[name] = {k: v for k, v in record.items() if k != "event"}
    steps = [x for x in lines if "loss" in x and "step" in x and "event" not in x]
    if steps:
        out["last_step"] = steps[-1]
    vals = [x for x in lines if "val_loss" in x and "event" not in x]
    if vals:
        out["last_val"] = vals[-1]
    return out


def manifest(run: Path) -> dict:
    """MANIFEST.json in the shipped model's layout, plus the run that made the weights."""
    data = json.loads((run / "manifest.json").read_text())
    totals = data["totals"]
    splits = totals.get("splits", {})
    return {
        "what": "the training corpus and run of this model",
        "held_out_policy": data.get("held_out_policy", ""),
        "held_out_files_dropped": data.get("held_out_files_dropped", {}),
        "tokenized": {"files": totals["files"], "bytes": totals["bytes"], "tokens": totals["tokens"],
                      "train_tokens": splits.get("train", {}).get("tokens", 0),
                      "val_tokens": splits.get("val", {}).get("tokens", 0),
                      "share_by_lang": totals.get("share_by_lang", {})},
        "sources": [{k: s[k] for k in ("name", "version", "files", "bytes") if k in s} for s in data["sources"]],
        "run": run_summary(run),
    }


def export(run: str | Path, out: str | Path, precision: str = "int8") -> dict:
    """Write the model folder; returns its file sizes and whether it fits the budget."""
    run, out = Path(run), Path(out)
    cfg = ModelConfig.load(run / "config.json")
    stored = read_safetensors(run / "final.safetensors")
    # in param_shapes' order: the file then has exactly prune.int8_weights_bytes(cfg) bytes
    weights = {k: np.asarray(stored[k], np.float32) for k in param_shapes(cfg)}
    if precision == "int8":
        save_model_folder(out, cfg, weights, run / "tokenizer.json", int8=True)
    elif precision == "bf16":
        save_model_folder(out, cfg, {}, run / "tokenizer.json", int8=False)  # config and tokenizer
        write_bf16_safetensors(out / "model.safetensors", weights)
    else:
        raise ValueError(f"precision must be int8 or bf16, not {precision!r}")
    (out / "MANIFEST.json").write_text(json.dumps(manifest(run), indent=1) + "\n")
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    total = sum(sizes.values())
    return {"folder": str(out), "precision": precision, "files": sizes, "bytes": total,
            "fits_64_mib": total <= BUDGET_BYTES}


def write_bf16_safetensors(path: Path, weights: dict[str, np.ndarray]) -> None:
    """float32 weights stored as bf16 (rounded to nearest even): half the bytes of float32,
    read back widened by folder.read_safetensors."""
    import struct

    header, offset, blobs = {}, 0, []
    for name, w in weights.items():
        bits = np.ascontiguousarray(w, np.float32).view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        blobs.append(rounded)
        header[name] = {"dtype": "BF16", "shape": list(w.shape), "data_offsets": [offset, offset + rounded.nbytes]}
        offset += rounded.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b.tobytes())


def write_pieces(folder: Path, run: Path, pieces: Path, name: str, piece_mib: float, max_files: int = 8,
                 logs: bool = True) -> dict:
    """folder (and the run's logs) as NAME.tar in pieces NAME.tar.part-00.. of at most
    piece_mib MiB, and NAME.JOIN.txt with the commands that check and unpack them where
    the pieces leave room for it among max_files (the join command is also returned)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname=name)
        for log in (LOG_FILES + ("prune.json",)) if logs else ():
            if (run / log).is_file():
                tar.add(run / log, arcname=f"{name}-{log}")
    data = buffer.getvalue()
    pieces.mkdir(parents=True, exist_ok=True)
    size = int(piece_mib * 2**20)
    names = []
    for i, start in enumerate(range(0, len(data), size)):
        part = pieces / f"{name}.tar.part-{i:02d}"
        part.write_bytes(data[start:start + size])
        names.append(part.name)
    digest = hashlib.sha256(data).hexdigest()
    join = (f"cat {name}.tar.part-* > {name}.tar && echo '{digest}  {name}.tar' | sha256sum -c - "
            f"&& tar -xf {name}.tar   # -> {name}/ (a model folder) and {name}-train_log.jsonl\n")
    if len(names) < max_files:  # a call brings back max_files files: the note goes only where it fits
        (pieces / f"{name}.JOIN.txt").write_text(join)
    elif len(names) > max_files:
        raise ValueError(f"{len(names)} pieces of {piece_mib} MiB: more than the {max_files} files a call brings back")
    return {"pieces": names, "tar_bytes": len(data), "sha256": digest, "join": join.strip()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="export", description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a distill.py / train.py output folder")
    ap.add_argument("--out", required=True, help="the model folder to write")
    ap.add_argument("--precision", default="int8", choices=("int8", "bf16"))
    ap.add_argument("--pieces", default="", help="also write the folder as tar pieces here")
    ap.add_argument("--piece-mib", type=float, default=15.0)
    ap.add_argument("--name", default="", help="the tar's name (default: the folder's)")
    ap.add_argument("--logs", action=argparse.BooleanOptionalAction, default=True,
                    help="the run's train_log.jsonl, stdout.log and prune.json in the tar too")
    args = ap.parse_args(argv)
    info = export(args.run, args.out, args.precision)
    if args.pieces:
        info.update(write_pieces(Path(args.out), Path(args.run), Path(args.pieces), args.name or Path(args.out).name,
                                 args.piece_mib, logs=args.logs))
    print(json.dumps(info, indent=1))
    if not info["fits_64_mib"] and args.precision == "int8":
        print(f"warning: the folder is {info['bytes'] / 2**20:.2f} MiB, over the 64 MiB budget", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
