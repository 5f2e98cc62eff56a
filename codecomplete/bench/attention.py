"""One decode step for N candidates: plain batched (per-branch context copies) against
bifurcated attention (context KV once), over N and context length."""

from __future__ import annotations

import argparse

from codecomplete.bench.common import emit, format_table, progress
from codecomplete.runtime import DEVICES

CPU_CONFIG = dict(vocab_size=16384, dim=512, n_layers=2, n_heads=8, ffn_dim=1408, max_seq_len=8192 + 64)
CUDA_CONFIG = dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, ffn_dim=11008, max_seq_len=16384 + 64)
H200_COPY_GBPS = 4300.0  # device-to-device copy, read + write, measured on an H200
CPU_COPY_GBPS = 9.5  # memory copy measured on the 2-core AVX2 box


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--n", default="1,4,16,32", help="comma-separated candidate counts")
    p.add_argument("--context", default=None, help="comma-separated context lengths (default 512,2048,8192; CUDA adds 16384)")
    p.add_argument("--layers", type=int, default=0, help="layers to run (default: CPU 2; CUDA as many as memory allows, at most 32)")
    p.add_argument("--decoded", type=int, default=16, help="tokens already decoded per branch")
    p.add_argument("--repeat", type=int, default=0, help="timed repetitions (median)")
    p.add_argument("--no-graphs", action="store_true", help="CUDA: no CUDA graph capture")
    p.add_argument("--no-unfused", action="store_true",
                   help="CUDA: skip the rows without the fused RMSNorm/RoPE kernels (plain_unfused, bifurcated_unfused)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None, help="write speedup against N to this PNG")


def _layers_that_fit(cfg, n_max: int, ctx_max: int, decoded: int, free_bytes: int) -> int:
    kv_per_layer = 2 * n_max * (ctx_max + decoded + 1) * cfg.n_kv_heads * cfg.head_dim * 2  # bf16 copies
    weights_per_layer = 2 * (4 * cfg.dim * cfg.dim + 3 * cfg.dim * cfg.ffn_dim)
    return max(1, min(32, int(free_bytes * 0.75) // (kv_per_layer + weights_per_layer)))


def _floor_ms(cfg, layers: int, n: int, ctx: int, decoded: int, bifurcated: bool, gbps: float, elem: int) -> float:
    """Memory-traffic floor: weights once, plus the K/V bytes the step must read."""
    kv_row = 2 * cfg.n_kv_heads * cfg.head_dim * elem  # k and v of one token in one layer
    kv = (ctx + n * decoded) * kv_row if bifurcated else n * (ctx + decoded) * kv_row
    weights = (4 * cfg.dim * cfg.dim + 3 * cfg.dim * cfg.ffn_dim) * elem
    head = cfg.vocab_size * cfg.dim * elem  # the output projection is read once per step too
    return (layers * (kv + weights) + head) / (gbps * 1e9) * 1e3


def run(args) -> int:
    import torch

    from codecomplete.bench.common import median_ms
    from codecomplete.bench.reference import REFERENCE_ATTENTION, decode_step_plain_cached
    from codecomplete.models import bifurcated_triton, fused_triton
    from codecomplete.models.format.config import ModelConfig
    from codecomplete.models.graph_timing import graph_us
    from codecomplete.models.model import Transformer

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("codecomplete bench attention: --device cuda but torch sees no CUDA device", flush=True)
        return 2
    ns = [int(x) for x in args.n.split(",")]
    contexts = [int(x) for x in args.context.split(",")] if args.context else (
        [512, 2048, 8192, 16384] if cuda else [512, 2048, 8192])
    dtype = torch.bfloat16 if cuda else torch.float32
    elem = 2 if cuda else 4
    base = dict(CUDA_CONFIG if cuda else CPU_CONFIG)
    base["max_seq_len"] = max(contexts) + args.decoded + 8
    probe = ModelConfig(**base)
    if args.layers:
        layers = args.layers
    elif cuda:
        layers = _layers_that_fit(probe, max(ns), max(contexts), args.decoded, torch.cuda.mem_get_info()[0])
    else:
        layers = 2
    cfg = ModelConfig(**{**base, "n_layers": layers})
    device = torch.device(args.device)
    torch.manual_seed(0)
    with torch.device(device):  # build and fill on the device: 7B-like layers are large
        model = Transformer(cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    model.eval()
    repeat = args.repeat or (50 if cuda else 5)
    sync = torch.cuda.synchronize if cuda else None
    gbps = H200_COPY_GBPS if cuda else CPU_COPY_GBPS
    L, G, D = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
    m_dec = args.decoded + 1
    progress(f"bench attention: {args.device}, dim {cfg.dim}, heads {cfg.n_heads}, layers {L}, {dtype}")

    def timed(step_fn) -> float:
        if not cuda or args.no_graphs:
            return median_ms(step_fn, repeat=repeat, warmup=2, sync=sync)
        return graph_us([step_fn], replays=repeat) / 1000.0

    # the bifurcated variants: library composition, two-part einsum, and (CUDA + Triton) the kernel
    def attention_of(mode: str):  # the model's own by name, the reference einsum from bench/reference.py
        return REFERENCE_ATTENTION.get(mode, mode)

    bif_modes = ["bifurcated", "bifurcated-einsum"] + (["bifurcated-triton"] if cuda and bifurcated_triton.AVAILABLE else [])
    unfused = cuda and fused_triton.AVAILABLE and not args.no_unfused
    rows = []
    with torch.inference_mode():
        for ctx in contexts:
            ctx_k = torch.randn(L, G, ctx, D, device=device, dtype=dtype)
            ctx_v = torch.randn(L, G, ctx, D, device=device, dtype=dtype)
            for n in ns:
                tokens = torch.randint(0, cfg.vocab_size, (n,), device=device)
                dec_k = torch.randn(L, n, G, m_dec, D, device=device, dtype=dtype)
                dec_v = torch.randn(L, n, G, m_dec, D, device=device, dtype=dtype)
                row = {"device": args.device, "n": n, "context": ctx, "layers": L}
                full_k = torch.empty(L, n, G, ctx + m_dec, D, device=device, dtype=dtype)
                full_v = torch.empty_like(full_k)
                full_k[:, :, :, :ctx] = ctx_k[:, None]
                full_v[:, :, :, :ctx] = ctx_v[:, None]
                full_k[:, :, :, ctx:] = dec_k
                full_v[:, :, :, ctx:] = dec_v
                # same inputs, so the outputs must agree before any timing counts
                ref = decode_step_plain_cached(model, tokens, full_k, full_v, ctx, args.decoded).float()
                for mode in bif_modes:
                    out = model.decode_step(tokens, ctx_k, ctx_v, dec_k, dec_v, args.decoded, attention_of(mode)).float()
                    err = float((out - ref).norm() / ref.norm())
                    row[mode.replace("-", "_") + "_rel_err"] = err
                    if err > (1e-1 if cuda else 1e-4):  # bf16 through many random layers drifts
                        raise AssertionError(f"{mode} differs from plain: relative error {err:.2e}")
                for mode in bif_modes:
                    row[mode.replace("-", "_") + "_ms"] = timed(
                        lambda mode=mode: model.decode_step(tokens, ctx_k, ctx_v, dec_k, dec_v, args.decoded,
                                                           attention_of(mode)))
                if unfused:  # the same steps with RMSNorm and RoPE as plain PyTorch ops (~40 more kernels a layer)
                    fused_triton.set_enabled(False)
                    row["bifurcated_unfused_ms"] = timed(
                        lambda: model.decode_step(tokens, ctx_k, ctx_v, dec_k, dec_v, args.decoded, "bifurcated"))
                dec_k = dec_v = None  # free before the plain copies
                if unfused:
                    row["plain_unfused_ms"] = timed(
                        lambda: decode_step_plain_cached(model, tokens, full_k, full_v, ctx, args.decoded))
                    fused_triton.set_enabled(True)
                row["plain_ms"] = timed(lambda: decode_step_plain_cached(model, tokens, full_k, full_v, ctx, args.decoded))
                full_k = full_v = None
                if cuda:
                    torch.cuda.empty_cache()
                best = min(bif_modes, key=lambda m: row[m.replace("-", "_") + "_ms"])
                row["best_bifurcated"] = best
                row["best_bifurcated_ms"] = row[best.replace("-", "_") + "_ms"]
                row["speedup"] = row["plain_ms"] / row["best_bifurcated_ms"]
                for mode in bif_modes:
                    suffix = mode.replace("bifurcated", "").replace("-", "_")
                    row["speedup" + (suffix or "_merged")] = row["plain_ms"] / row[mode.replace("-", "_") + "_ms"]
                if unfused:
                    row["speedup_unfused"] = row["plain_unfused_ms"] / row["bifurcated_unfused_ms"]
                row["floor_plain_ms"] = _floor_ms(cfg, L, n, ctx, args.decoded, False, gbps, elem)
                row["floor_bifurcated_ms"] = _floor_ms(cfg, L, n, ctx, args.decoded, True, gbps, elem)
                row["bifurcated_vs_floor"] = row["best_bifurcated_ms"] / row["floor_bifurcated_ms"]
                row["plain_vs_floor"] = row["plain_ms"] / row["floor_plain_ms"]
                rows.append(row)
                progress(f"  n={n:3d} ctx={ctx:6d} plain {row['plain_ms']:.3f} ms  {best} "
                         f"{row['best_bifurcated_ms']:.3f} ms  x{row['speedup']:.2f}")
            ctx_k = ctx_v = None
    for r in rows:  # N=32 against N=1 at the same context: the 'N candidates for the price of one' figure
        one = next((x for x in rows if x["context"] == r["context"] and x["n"] == 1), None)
        if one:
            r["bifurcated_vs_n1"] = r["best_bifurcated_ms"] / one["best_bifurcated_ms"]
    result = {"benchmark": "attention", "device": args.device,
              "config": {"dim": cfg.dim, "heads": cfg.n_heads, "kv_heads": G, "layers": L, "ffn": cfg.ffn_dim,
                         "dtype": str(dtype).replace("torch.", ""), "decoded_tokens": args.decoded,
                         "cuda_graphs": cuda and not args.no_graphs,
                         "fused_norm_rope": cuda and fused_triton.AVAILABLE,
                         "gpu": torch.cuda.get_device_name() if cuda else None},
              "rows": rows}
    cols = ["n", "context", "plain_ms", "bifurcated_ms", "bifurcated_einsum_ms"]
    cols += ["bifurcated_triton_ms"] if "bifurcated-triton" in bif_modes else []
    cols += ["plain_unfused_ms", "bifurcated_unfused_ms"] if unfused else []
    table = format_table(rows, cols + ["speedup", "bifurcated_vs_n1", "floor_bifurcated_ms", "bifurcated_vs_floor"])
    emit(result, args.json, table)
    if args.plot:
        plot_speedup(rows, args.plot, f"{args.device}: {L} layers, dim {cfg.dim}, {cfg.n_heads} heads")
    return 0


def plot_speedup(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for ctx in sorted({r["context"] for r in rows}):
        pts = sorted((r["n"], r["speedup"]) for r in rows if r["context"] == ctx)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"context {ctx}")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("candidates N")
    ax.set_ylabel("speedup of bifurcated over plain")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
