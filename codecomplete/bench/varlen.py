"""The varlen decode kernel's launch shape: slices of each context, row block, warps and key
tile, swept over a batched step's cases (requests x rows at a context length), against
the shape the runtime picks. One layer, 7B's attention shape by default (4 kv heads of 7
query heads, head size 128, bf16), timed as CUDA-graph replays; on CPU (fp32) through
Triton's interpreter (TRITON_INTERPRET=1), for the code path only.

    codecomplete bench varlen --device cuda --json --plot varlen.png
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

from codecomplete.bench.common import emit, format_table, progress

DEFAULT_CASES = "1x4@1400,4x4@1400,13x3@1400,24x3@1400,48x3@1400,1x4@8000,8x4@4000"
SPLITS = (1, 2, 4, 8, 16, 32, 64)
BLOCK_Q = (16, 32, 64)
WARPS = (2, 4, 8)
BLOCK_K = (32, 64, 128)
COMBINE_WARPS = (1, 4)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--cases", default=DEFAULT_CASES,
                   help="comma-separated REQUESTSxROWS@CONTEXT (a step's requests, rows each, context tokens)")
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--heads-per-kv", type=int, default=7)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="two shapes per case (the code path, not a sweep)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None, help="write each case's time by slices (best shape) to this PNG")


def parse_cases(text: str) -> list[tuple[int, int, int]]:
    out = []
    for part in text.split(","):
        try:
            counts, ctx = part.strip().split("@")
            nreq, nrows = counts.split("x")
            case = (int(nreq), int(nrows), int(ctx))
        except ValueError:
            raise SystemExit(f"bench varlen: bad case {part!r} (REQUESTSxROWS@CONTEXT, e.g. 13x3@1400)") from None
        if min(case) < 1:
            raise SystemExit(f"bench varlen: bad case {part!r}: counts must be at least 1")
        out.append(case)
    return out


def _timer(cuda: bool):
    from codecomplete.models.graph_timing import graph_us

    def timed(fn, reps: int = 20) -> float:
        """Microseconds a call, from CUDA-graph replays of `reps` calls (0 on CPU: not timed)."""
        if not cuda:
            fn()
            return 0.0
        return graph_us([fn] * reps, replays=5)

    return timed


def run_case(case, args, timed) -> dict:
    import torch

    from codecomplete.models import varlen_triton as vt

    nreq, nrows, ctx = case
    cuda = args.device == "cuda"
    dev, dt = args.device, torch.bfloat16 if cuda else torch.float32
    g, p, d = args.kv_heads, args.heads_per_kv, args.head_dim
    gen = torch.Generator().manual_seed(0)
    reqs = []
    for _ in range(nreq):
        ck, cv = (torch.randn(1, g, ctx + 256, d, generator=gen).to(dev, dt) for _ in range(2))
        bk, bv = (torch.randn(1, nrows, g, 16, d, generator=gen).to(dev, dt) for _ in range(2))
        reqs.append(vt.VarlenRequest(ck, cv, ctx, bk, bv, 5))
    rows = nreq * nrows
    slots = 1 << (rows - 1).bit_length()
    meta = np.zeros((vt.FIELDS, slots), np.int64)
    scratch = [torch.zeros(1, 1, g, 1, d, device=dev, dtype=dt) for _ in range(2)]
    vt.fill_meta(meta, reqs, *scratch)
    meta = torch.from_numpy(meta).to(dev)
    q = torch.randn(slots, g * p, d, generator=gen).to(dev, dt)
    kn, vn = (torch.randn(slots, g, d, generator=gen).to(dev, dt) for _ in range(2))
    sm = torch.cuda.get_device_properties(0).multi_processor_count if cuda else 4
    picked = vt.plan_varlen(slots, 32, g * p, g, sm)
    scale = d ** -0.5
    ref = vt.varlen_bifurcated_attention(q, kn, vn, meta, 0, picked, scale)[:rows].float()
    default_us = timed(lambda: vt.varlen_bifurcated_attention(q, kn, vn, meta, 0, picked, scale))
    shapes = (itertools.product(SPLITS, BLOCK_Q, WARPS, BLOCK_K, COMBINE_WARPS) if not args.quick
              else [(1, 16, 4, 32, 1), (2, 32, 4, 32, 1)])
    trials = []
    for splits, block_q, warps, block_k, combine in shapes:
        plan = vt.VarlenPlan(slots, splits, block_q, -(-(min(slots, 32) * p) // block_q), p)

        def call(plan=plan, block_k=block_k, warps=warps, combine=combine):
            return vt.varlen_bifurcated_attention(q, kn, vn, meta, 0, plan, scale, block_k, warps, combine)

        try:
            err = float((call()[:rows].float() - ref).abs().max())
            us = timed(call)
        except Exception as e:  # a shape the GPU cannot hold (shared memory): not a candidate
            progress(f"    {splits} slices, {block_q}-row blocks, {warps} warps, {block_k}-key tiles: {e}")
            continue
        trials.append({"us": us, "n_splits": splits, "block_q": block_q, "warps": warps, "block_k": block_k,
                       "combine_warps": combine, "max_abs_diff": err})
    trials.sort(key=lambda t: t["us"])
    best = trials[0] if trials else {}
    return {"case": f"{nreq}x{nrows}@{ctx}", "requests": nreq, "rows": rows, "context": ctx, "slots": slots,
            "default_us": default_us, "default_n_splits": picked.n_splits, "default_block_q": picked.block_q,
            "best_us": best.get("us"), "default_vs_best": default_us / best["us"] if best.get("us") else None,
            **{f"best_{k}": v for k, v in best.items() if k != "us"},
            "by_splits_us": {s: min((t["us"] for t in trials if t["n_splits"] == s), default=None) for s in SPLITS},
            "top": trials[:5]}


def run(args) -> int:
    import os

    from codecomplete.models import varlen_triton as vt

    cases = parse_cases(args.cases)
    if not vt.AVAILABLE:
        raise SystemExit("bench varlen: needs the triton package")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("bench varlen: --device cuda, but torch sees no CUDA device")
    elif os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("bench varlen: --device cpu runs through Triton's interpreter: set TRITON_INTERPRET=1")
    timed = _timer(args.device == "cuda")
    rows = []
    for case in cases:
        row = run_case(case, args, timed)
        progress(f"  {row['case']}: default {row['default_us']:.1f} us, best {row['best_us'] or 0:.1f} us "
                 f"({row.get('best_n_splits')} slices, {row.get('best_warps')} warps)")
        rows.append(row)
    result = {"benchmark": "varlen", "device": args.device, "kv_heads": args.kv_heads,
              "heads_per_kv": args.heads_per_kv, "head_dim": args.head_dim, "rows": rows}
    emit(result, args.json, format_table(rows, ["case", "slots", "default_us", "default_n_splits", "best_us",
                                                "default_vs_best", "best_n_splits", "best_block_q", "best_warps",
                                                "best_block_k", "best_combine_warps"]))
    if args.plot:
        plot(rows, args.plot)
    return 0


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        xs = [s for s in SPLITS if r["by_splits_us"].get(s)]
        ax.plot(xs, [r["by_splits_us"][s] for s in xs], marker="o", label=r["case"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("slices of each context")
    ax.set_ylabel("us per layer (best shape)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
