"""A small student from a trained teacher: prune depth and width, factorize the embedding.

Minitron (Muralidharan et al. 2024; Sreenivas et al. 2024) starts a small model from a
trained large one instead of from random weights: rank layers, FFN neurons and hidden
channels by their activations on a calibration batch, keep the most important ones,
then distil. The student keeps the teacher's tokenizer, attention heads and RoPE; what
shrinks is chosen by a StudentShape:

- depth: which teacher layers survive (`pick`): by block influence (1 - cosine of a
  block's input and output, ShortGPT's measure: a block that barely turns the residual
  stream matters least), the first L-1 and the last ("ends"), evenly spaced, or an
  explicit list of teacher layer ids ("0,1,2,23");
- FFN width: per kept layer the neurons with the largest expected squared contribution
  to the residual stream, E[act_n²]·‖W2[:, n]‖²;
- hidden width (optional, `dim` < the teacher's): the residual channels of most energy
  at the norms' inputs; each RMSNorm weight is rescaled by how much the kept channels'
  RMS differs from the full one on the calibration batch;
- the embedding: the tied table E (V, dim) becomes A (V, r) · B (r, dim) by a truncated
  SVD, plain or weighted by the second moment C of the final normed hidden states (the
  head's error ‖h·(E - AB)ᵀ‖ is what the logits see: SVD of E·C^½, then B = Vᵣᵀ·C^-½).

`calibrate` runs the teacher (torch) once over the calibration rows with hooks; `prune`
is numpy. `shipped_bytes` is the exact size of the int8 model folder a shape gives.

    python -m codecomplete.models.prune init --teacher QWEN.gguf --data DATA --out DIR --shape L8-F1216-r128
    python -m codecomplete.models.prune compare --teacher QWEN.gguf --data DATA --heldout DIRS \
        --shapes "L8-F1216-r128 L12-F576-r128" [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .format.config import ModelConfig
from .format.folder import EMBED_PROJ, param_shapes

PICKS = ("influence", "ends", "even")
BUDGET_BYTES = 64 << 20
COV_FLOOR = 1e-2  # least weight of a hidden direction in the weighted SVD (mean weight 1)  # everything the model folder ships: weights, tokenizer, config, cards


@dataclass
class StudentShape:
    n_layers: int
    ffn_dim: int
    embed_rank: int
    dim: int = 0  # 0: the teacher's width
    pick: str = "influence"  # a PICKS rule, or teacher layer ids "0,1,5,23"
    svd: str = "weighted"  # "weighted" (by the head's input statistics) or "plain"

    def describe(self) -> str:
        """The shape as `parse` reads it, e.g. L8-F1216-r128-influence-weighted."""
        width = f"d{self.dim}-" if self.dim else ""
        return f"{width}L{self.n_layers}-F{self.ffn_dim}-r{self.embed_rank}-{self.pick}-{self.svd}"

    @classmethod
    def parse(cls, spec: str) -> StudentShape:
        """L<layers>-F<ffn>-r<rank>, optionally d<width>, a pick (PICKS or layer ids
        "0,1,23") and an svd ("weighted", "plain"), dash-separated in any order."""
        found: dict = {}
        for part in spec.split("-"):
            key, number = part[:1], part[1:]
            if key in "LFrd" and number.isdigit():
                found[{"L": "n_layers", "F": "ffn_dim", "r": "embed_rank", "d": "dim"}[key]] = int(number)
            elif part in ("weighted", "plain"):
                found["svd"] = part
            elif part in PICKS or all(x.isdigit() for x in part.split(",")):
                found["pick"] = part
            else:
                raise ValueError(f"shape {spec!r}: cannot read {part!r}")
        if not {"n_layers", "ffn_dim", "embed_rank"} <= set(found):
            raise ValueError(f"shape {spec!r} needs L<layers>, F<ffn> and r<rank>")
        return cls(**found)


@dataclass
class CalibrationStats:
    """Sums over the calibration tokens (divide by `tokens`), one entry per teacher layer."""

    tokens: int = 0
    ffn_sq: list[np.ndarray] = field(default_factory=list)  # (F,) Σ act² at each w2 input
    influence: np.ndarray | None = None  # (L,) Σ (1 - cos(block input, block output))
    norm_sq: dict[str, np.ndarray] = field(default_factory=dict)  # norm name -> (dim,) Σ x² at its input
    head_cov: np.ndarray | None = None  # (dim, dim) Σ h hᵀ of the final normed hidden states

    def layer_order(self) -> list[int]:
        """Teacher layers, most influential first."""
        return [int(i) for i in np.argsort(-self.influence, kind="stable")]


def calibrate(teacher, rows, micro_batch: int = 4) -> CalibrationStats:
    """Statistics of the teacher (a models.model.Transformer) over token rows (B, T)."""
    import torch

    cfg = teacher.cfg
    stats = CalibrationStats(ffn_sq=[np.zeros(cfg.ffn_dim) for _ in range(cfg.n_layers)],
                             influence=np.zeros(cfg.n_layers), head_cov=np.zeros((cfg.dim, cfg.dim)))
    hooks = []

    def add(store: dict | list, key, value: torch.Tensor) -> None:
        store[key] = store[key] + value.double().cpu().numpy() if (
            isinstance(store, list) or key in store) else value.double().cpu().numpy()

    for i, layer in enumerate(teacher.layers):
        hooks.append(layer.feed_forward.w2.register_forward_pre_hook(
            lambda _m, args, i=i: add(stats.ffn_sq, i, args[0].float().pow(2).sum(dim=(0, 1)))))

        def block_hook(_m, args, out, i=i):
            x, y = args[0].float(), out.float()
            stats.influence[i] += float((1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).sum())
        hooks.append(layer.register_forward_hook(block_hook))
        for name in ("attention_norm", "ffn_norm"):
            hooks.append(getattr(layer, name).register_forward_pre_hook(
                lambda _m, args, key=f"layers.{i}.{name}": add(stats.norm_sq, key, args[0].float().pow(2).sum(dim=(0, 1)))))
    hooks.append(teacher.norm.register_forward_pre_hook(
        lambda _m, args: add(stats.norm_sq, "norm", args[0].float().pow(2).sum(dim=(0, 1)))))

    def head_hook(_m, _args, out):
        h = out.float().reshape(-1, out.shape[-1])
        stats.head_cov += (h.T @ h).double().cpu().numpy()
    hooks.append(teacher.norm.register_forward_hook(head_hook))
    try:
        with torch.no_grad():
            for start in range(0, rows.shape[0], micro_batch):
                batch = rows[start:start + micro_batch]
                teacher.features(batch)
                stats.tokens += batch.numel()
    finally:
        for h in hooks:
            h.remove()
    return stats


def pick_layers(shape: StudentShape, n_teacher_layers: int, stats: CalibrationStats | None) -> list[int]:
    """The teacher layers the student keeps, in order."""
    n = shape.n_layers
    if not 0 < n <= n_teacher_layers:
        raise ValueError(f"a student of {n} layers from a teacher of {n_teacher_layers}")
    if shape.pick == "influence":
        if stats is None:
            raise ValueError("pick 'influence' needs calibration statistics")
        return sorted(stats.layer_order()[:n])
    if shape.pick == "ends":
        return [*range(n - 1), n_teacher_layers - 1] if n > 1 else [0]
    if shape.pick == "even":
        return sorted({int(round(x)) for x in np.linspace(0, n_teacher_layers - 1, n)})
    try:
        layers = [int(x) for x in shape.pick.split(",")]
    except ValueError:
        raise ValueError(f"pick must be one of {', '.join(PICKS)} or layer ids, not {shape.pick!r}") from None
    if len(layers) != n or len(set(layers)) != n or not all(0 <= i < n_teacher_layers for i in layers):
        raise ValueError(f"pick {shape.pick!r}: {n} distinct layer ids below {n_teacher_layers} expected")
    return sorted(layers)


def factorize_embedding(table: np.ndarray, rank: int, head_cov: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(A (V, r), B (r, dim)) with A·B ≈ table; with head_cov C, the best rank-r fit of the
    logits h·tableᵀ for hidden states of second moment C (else of the table itself)."""
    e = np.asarray(table, np.float64)
    dim = e.shape[1]
    if not 0 < rank <= dim:
        raise ValueError(f"embedding rank {rank} must lie in 1..{dim}")
    if head_cov is None:
        root = inv_root = np.eye(dim)
    else:
        # scale-free (mean eigenvalue 1), and every direction weighs at least COV_FLOOR: a
        # calibration of fewer tokens than dims leaves some unseen (eigenvalues 0, or
        # slightly negative in floating point), and C^-½ must stay finite and moderate
        w, v = np.linalg.eigh(head_cov / np.trace(head_cov) * dim)
        w = np.maximum(w, COV_FLOOR)
        root = (v * np.sqrt(w)) @ v.T
        inv_root = (v / np.sqrt(w)) @ v.T
    m = e @ root
    # right singular vectors from the (dim, dim) Gram matrix: no (V, V) work
    s2, vecs = np.linalg.eigh(m.T @ m)
    top = np.argsort(-s2)[:rank]
    v_r = vecs[:, top]  # (dim, r)
    a = m @ v_r  # (V, r) = U_r S_r
    b = v_r.T @ inv_root  # (r, dim)
    return a.astype(np.float32), b.astype(np.float32)


def _keep_top(scores: np.ndarray, k: int) -> np.ndarray:
    if not 0 < k <= len(scores):
        raise ValueError(f"cannot keep {k} of {len(scores)}")
    return np.sort(np.argsort(-scores, kind="stable")[:k])


def student_config(teacher: ModelConfig, shape: StudentShape, max_seq_len: int = 2048) -> ModelConfig:
    """The teacher's config at the student's shape; its eos list starts with <|endoftext|>
    (the end of a FIM middle, fim.FimIds.from_config's eot) where the teacher has it."""
    eos = list(teacher.eos_ids)
    if teacher.pad_id in eos:  # Qwen: pad is <|endoftext|>, its eos list starts with <|im_end|>
        eos.remove(teacher.pad_id)
        eos.insert(0, teacher.pad_id)
    return replace(teacher, dim=shape.dim or teacher.dim, n_layers=shape.n_layers, ffn_dim=shape.ffn_dim,
                   embed_rank=shape.embed_rank, tie_embeddings=True, eos_ids=eos, fim_order="spm",
                   max_seq_len=min(max_seq_len, teacher.max_seq_len), align_back_off="needed",
                   head_dim=teacher.head_dim)


def prune(teacher_cfg: ModelConfig, weights: dict[str, np.ndarray], shape: StudentShape,
          stats: CalibrationStats | None, max_seq_len: int = 2048) -> tuple[ModelConfig, dict[str, np.ndarray], dict]:
    """(student config, float weights, what was kept) from the teacher's float weights."""
    cfg = student_config(teacher_cfg, shape, max_seq_len)
    layers = pick_layers(shape, teacher_cfg.n_layers, stats)
    needs_stats = shape.ffn_dim < teacher_cfg.ffn_dim or cfg.dim < teacher_cfg.dim or shape.svd == "weighted"
    if needs_stats and stats is None:
        raise ValueError("pruning width or a weighted SVD needs calibration statistics")
    if cfg.dim > teacher_cfg.dim or shape.ffn_dim > teacher_cfg.ffn_dim:
        raise ValueError("a student cannot be wider than its teacher")
    # hidden channels
    if cfg.dim < teacher_cfg.dim:
        energy = sum(stats.norm_sq[f"layers.{i}.{n}"] for i in layers for n in ("attention_norm", "ffn_norm"))
        channels = _keep_top(energy + stats.norm_sq["norm"], cfg.dim)
    else:
        channels = np.arange(teacher_cfg.dim)

    def norm_weight(name: str, key: str) -> np.ndarray:
        w = weights[name][channels]
        if stats is None or len(channels) == teacher_cfg.dim:
            return w.astype(np.float32)
        sq = stats.norm_sq[key]
        # the kept channels' mean square against the full one: RMSNorm divides by the latter
        return (w * np.sqrt(sq[channels].mean() / sq.mean())).astype(np.float32)

    out: dict[str, np.ndarray] = {}
    kept = {"teacher_layers": layers, "ffn_neurons_kept": [], "hidden_channels": int(len(channels))}
    for j, i in enumerate(layers):
        src, dst = f"layers.{i}.", f"layers.{j}."
        out[dst + "attention_norm.weight"] = norm_weight(src + "attention_norm.weight", f"layers.{i}.attention_norm")
        out[dst + "ffn_norm.weight"] = norm_weight(src + "ffn_norm.weight", f"layers.{i}.ffn_norm")
        for part in ("wq", "wk", "wv"):
            out[dst + f"attention.{part}.weight"] = weights[src + f"attention.{part}.weight"][:, channels]
            if cfg.qkv_bias:
                out[dst + f"attention.{part}.bias"] = weights[src + f"attention.{part}.bias"]
        out[dst + "attention.wo.weight"] = weights[src + "attention.wo.weight"][channels]
        w2 = weights[src + "feed_forward.w2.weight"]
        if shape.ffn_dim < teacher_cfg.ffn_dim:
            importance = stats.ffn_sq[i] / stats.tokens * (w2.astype(np.float64) ** 2).sum(axis=0)
            neurons = _keep_top(importance, shape.ffn_dim)
        else:
            neurons = np.arange(teacher_cfg.ffn_dim)
        kept["ffn_neurons_kept"].append(int(len(neurons)))
        out[dst + "feed_forward.w1.weight"] = weights[src + "feed_forward.w1.weight"][neurons][:, channels]
        out[dst + "feed_forward.w3.weight"] = weights[src + "feed_forward.w3.weight"][neurons][:, channels]
        out[dst + "feed_forward.w2.weight"] = w2[channels][:, neurons]
    out["norm.weight"] = norm_weight("norm.weight", "norm")
    # the head is what the logits see: the teacher's output matrix where it has its own
    table = weights.get("output.weight", weights["tok_embeddings.weight"])[:, channels]
    cov = None
    if shape.svd == "weighted":
        cov = stats.head_cov[np.ix_(channels, channels)]
    elif shape.svd != "plain":
        raise ValueError(f"svd must be 'weighted' or 'plain', not {shape.svd!r}")
    if shape.embed_rank:
        out["tok_embeddings.weight"], out[EMBED_PROJ] = factorize_embedding(table, shape.embed_rank, cov)
    else:
        out["tok_embeddings.weight"] = np.asarray(table, np.float32)
    out = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}
    expected = param_shapes(cfg)
    if {k: v.shape for k, v in out.items()} != expected:
        raise AssertionError("pruned weights do not have the student's shapes")
    return cfg, out, kept


def int8_weights_bytes(cfg: ModelConfig) -> int:
    """Exact size of the int8 model.safetensors of a config (folder.save_model_folder's
    layout: int8 matrices with float32 scales per row, float32 vectors) written in
    param_shapes' order, as export.py writes it (another order changes the header's
    offsets by a few digits)."""
    header: dict = {}
    offset = 0
    for name, shape in param_shapes(cfg).items():
        parts = [(name, "I8" if len(shape) == 2 else "F32", shape)]
        if len(shape) == 2:
            parts.append((name + "_scale", "F32", (shape[0],)))
        for key, dtype, shp in parts:
            size = int(np.prod(shp)) * (1 if dtype == "I8" else 4)
            header[key] = {"dtype": dtype, "shape": list(shp), "data_offsets": [offset, offset + size]}
            offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    return 8 + len(raw) + (-len(raw) % 8) + offset


def shipped_bytes(cfg: ModelConfig, other_files_bytes: int) -> int:
    """The model folder's bytes: int8 weights plus the other files (tokenizer, config, cards)."""
    return int8_weights_bytes(cfg) + other_files_bytes


# ---------------------------------------------------------------- the command


def load_teacher(path: str | Path):
    """(config, float32 weights, tokenizer) of a teacher: a .gguf file (dequantized) or a
    model folder."""
    from .format.source import load_model_source

    path = Path(path)
    if path.suffix == ".gguf":
        from .format.gguf_import import convert_gguf

        cfg, hf_tok, weights = convert_gguf(path, "fp32")
        from .format.tokenizer import Tokenizer

        return cfg, weights, Tokenizer(hf_tok)
    from .format.folder import dequantize

    source = load_model_source(path)
    return source.config, dequantize(source.weights), source.tokenizer


def calibration_rows(data_dir: str | Path, cfg: ModelConfig, n_rows: int, seq_len: int, seed: int = 777):
    """Training-split rows (FIM and plain, as the loop sees them) for calibration."""
    from .train.data import PackConfig, fixed_batches
    from .train.fim import FimIds

    batches = fixed_batches(data_dir, "train", PackConfig(seq_len=seq_len, batch_size=n_rows, seed=seed),
                            FimIds.from_config(cfg), 1)
    return batches[0][:, :seq_len]


def compare(teacher_path: str, data_dir: str, heldout: list[str], shapes: list[StudentShape], n_rows: int,
            seq_len: int, device: str, out_dir: str = "", limit_files: int = 0, teacher_loss: bool = False) -> dict:
    """Loss before training of each candidate shape on held-out files (bits per byte) and
    its exact int8 size; with out_dir, each candidate's int8 model folder for latency runs."""
    from .evaluate_loss import evaluate_model
    from .format.folder import save_model_folder

    tcfg, weights, tok = load_teacher(teacher_path)
    teacher = teacher_model(tcfg, weights, device)
    rows = calibration_rows(data_dir, student_config(tcfg, shapes[0]), n_rows, seq_len).to(device)
    start = time.time()
    stats = calibrate(teacher, rows)
    report: dict = {"calibration_tokens": stats.tokens, "calibration_s": round(time.time() - start, 1),
                    "layer_influence": [round(x / stats.tokens, 5) for x in stats.influence], "candidates": []}
    if teacher_loss:
        report["teacher"] = evaluate_model(teacher, tok, heldout, seq_len, limit_files)
    del teacher
    for shape in shapes:
        cfg, student, kept = prune(tcfg, weights, shape, stats)
        loss = evaluate_model(teacher_model(cfg, student, device), tok, heldout, seq_len, limit_files)
        row = {"shape": shape.describe(), "params": cfg.n_params(), "int8_weights_bytes": int8_weights_bytes(cfg),
               "teacher_layers": kept["teacher_layers"], **loss}
        if out_dir:
            folder = Path(out_dir) / shape.describe()
            save_model_folder(folder, cfg, student, Path(data_dir) / "tokenizer.json", int8=True)
            row["folder"] = str(folder)
        report["candidates"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="prune", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("init", "compare"):
        p = sub.add_parser(name, help={"init": "write one student as a float model folder",
                                       "compare": "loss before training of candidate shapes"}[name])
        p.add_argument("--teacher", required=True, help=".gguf file or model folder")
        p.add_argument("--data", required=True, help="prepare.py output (calibration rows from its train split)")
        p.add_argument("--calibration-rows", type=int, default=32)
        p.add_argument("--seq-len", type=int, default=2048)
        p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    init = sub.choices["init"]
    init.add_argument("--out", required=True, help="model folder to write (float weights)")
    init.add_argument("--shape", required=True, help="e.g. L8-F1216-r128 (StudentShape.parse)")
    init.add_argument("--tokenizer", default="", help="tokenizer.json to ship (default: the data's)")
    cmp = sub.choices["compare"]
    cmp.add_argument("--shapes", required=True, help="comma-free list, separated by spaces or ';'")
    cmp.add_argument("--heldout", nargs="+", required=True, help="files or folders of held-out code")
    cmp.add_argument("--limit-files", type=int, default=0)
    cmp.add_argument("--teacher-loss", action="store_true", help="also the teacher's held-out loss")
    cmp.add_argument("--out", default="", help="write each candidate's int8 folder here")
    args = ap.parse_args(argv)
    if args.cmd == "init":
        info = make_student(args.teacher, args.data, args.out, StudentShape.parse(args.shape), args.calibration_rows,
                            args.seq_len, args.device, args.tokenizer)
    else:
        shapes = [StudentShape.parse(x) for x in args.shapes.replace(";", " ").split()]
        info = compare(args.teacher, args.data, args.heldout, shapes, args.calibration_rows, args.seq_len,
                       args.device, args.out, args.limit_files, args.teacher_loss)
    print(json.dumps(info, indent=1))
    return 0


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def teacher_model(cfg: ModelConfig, weights: dict[str, np.ndarray], device: str = "cpu", dtype=None):
    """A models.model.Transformer holding the teacher's weights, in eval mode, no gradients."""
    import torch

    from .model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()},
                          strict=True, assign=True)
    model = model.to(device=device, dtype=dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32))
    return model.eval().requires_grad_(False)


def make_student(teacher_path: str, data_dir: str, out: str, shape: StudentShape, n_rows: int, seq_len: int,
                 device: str, tokenizer_file: str = "") -> dict:
    """Load the teacher, calibrate it on training rows, prune, and write the student (see write_student)."""
    tcfg, weights, _tok = load_teacher(teacher_path)
    teacher = teacher_model(tcfg, weights, device)
    rows = calibration_rows(data_dir, student_config(tcfg, shape), n_rows, seq_len).to(device)
    return write_student(out, tcfg, weights, teacher, shape, rows, tokenizer_file or str(Path(data_dir) / "tokenizer.json"),
                         Path(teacher_path).name)


def write_student(out: str | Path, tcfg: ModelConfig, weights: dict[str, np.ndarray], teacher, shape: StudentShape,
                  rows, tokenizer_file: str | Path, teacher_name: str, max_seq_len: int = 2048) -> dict:
    """Calibrate the teacher model on rows, prune its weights to the shape and write the
    student as a float model folder with prune.json (the shape, what was kept, the
    calibration's size); written to a temporary folder and renamed, so whole or not at all."""
    import shutil
    import tempfile

    from .format.folder import save_model_folder

    start = time.time()
    stats = calibrate(teacher, rows)
    cfg, student, kept = prune(tcfg, weights, shape, stats, max_seq_len)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    save_model_folder(tmp, cfg, student, tokenizer_file, int8=False)
    info = {"shape": asdict(shape), "name": shape.describe(), "teacher": teacher_name, **kept,
            "params": cfg.n_params(), "int8_weights_bytes": int8_weights_bytes(cfg),
            "calibration_tokens": stats.tokens, "layer_influence": [round(x / stats.tokens, 5) for x in stats.influence],
            "seconds": round(time.time() - start, 1)}
    (tmp / "prune.json").write_text(json.dumps(info, indent=1) + "\n")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return info


if __name__ == "__main__":
    sys.exit(main())
