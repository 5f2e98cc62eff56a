"""N-candidate generation end to end on the torch runtime: prefill once, N branches for a
fixed number of tokens; plain vs bifurcated attention, bf16 vs int8; time and peak memory."""

from __future__ import annotations

import argparse
import time

from codecomplete.bench.common import emit, format_table, progress
from codecomplete.runtime import DEVICES

SEVEN_B = dict(vocab_size=32000, dim=4096, n_heads=32, ffn_dim=11008)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", choices=DEVICES)
    p.add_argument("--model", default=None, help="model to load (default: the shipped model)")
    p.add_argument("--shapes", default="ours,7b", help="ours (the loaded model) and/or 7b (random 7B-like layers)")
    p.add_argument("--layers-7b", type=int, default=8, help="layers of the random 7B-like model")
    p.add_argument("--n", default="1,4,16,32")
    p.add_argument("--context", default="2048,8192,16384", help="prompt lengths (capped by each model's context)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--precisions", default="bf16,int8", help="bf16, fp32, int8 (CUDA int8: bitsandbytes)")
    p.add_argument("--attention", default="plain,bifurcated",
                   help="plain, bifurcated, bifurcated-einsum, bifurcated-triton (CUDA)")
    p.add_argument("--agreement", action="store_true", help="top-1 agreement of each precision with the first")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _completion(rt, prompt: list[int], n: int, new_tokens: int, device: str) -> dict:
    """Prefill once, then new_tokens decode steps for n branches; wall times in ms."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    state, logits = rt.prefill(prompt)
    _sync(device)
    t1 = time.perf_counter()
    branches = rt.start_branches(state, n, new_tokens + 1)
    tokens = [int(logits.argmax())] * n
    for _ in range(new_tokens):
        out = rt.decode(state, branches, tokens)
        tokens = [int(x) for x in out.argmax(axis=-1)]
    _sync(device)
    t2 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    return {"prefill_ms": (t1 - t0) * 1000, "decode_ms": (t2 - t1) * 1000,
            "step_ms": (t2 - t1) * 1000 / new_tokens, "completion_ms": (t2 - t0) * 1000, "peak_mib": peak}


def _agreement(runtimes: dict, texts: list[list[int]]) -> dict:
    """Share of positions where each runtime's argmax equals the first runtime's."""
    import torch

    names = list(runtimes)
    ref = names[0]
    out = {}
    with torch.inference_mode():
        argmaxes = {}
        for name, rt in runtimes.items():
            argmaxes[name] = [rt.model(torch.tensor(t, device=rt.device)[None])[0].float().argmax(-1).cpu()
                              for t in texts]
    for name in names[1:]:
        agree = sum(int((a == b).sum()) for a, b in zip(argmaxes[name], argmaxes[ref], strict=True))
        total = sum(a.numel() for a in argmaxes[ref])
        out[f"{name}_vs_{ref}"] = agree / total
    return out


def run(args) -> int:
    import numpy as np
    import torch

    from codecomplete.bench.reference import torch_runtime
    from codecomplete.models.format.config import ModelConfig
    from codecomplete.models.format.source import load_model_source
    from codecomplete.models.model import Transformer

    if args.device == "cuda" and not torch.cuda.is_available():
        print("codecomplete bench generate: --device cuda but torch sees no CUDA device")
        return 2
    ns = [int(x) for x in args.n.split(",")]
    contexts = [int(x) for x in args.context.split(",")]
    precisions = args.precisions.split(",")
    modes = args.attention.split(",")
    rng = np.random.default_rng(0)
    rows, agreement, weights = [], {}, {}
    for shape in args.shapes.split(","):
        if shape == "ours":
            source = load_model_source(args.model)
            build = lambda precision, mode, source=source: torch_runtime(  # noqa: E731
                mode, source, device=args.device, precision=precision)
            cfg = source.config
        elif shape == "7b":
            cfg = ModelConfig(**SEVEN_B, n_layers=args.layers_7b, max_seq_len=max(contexts) + args.new_tokens + 8)
            with torch.device(args.device):
                base = Transformer(cfg).to(torch.bfloat16)
            with torch.no_grad():
                for name, p in base.named_parameters():
                    p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)

            def build(precision, mode, base=base):
                model = base if precision != "int8" else _copy_model(base)
                return torch_runtime(mode, model=model, device=args.device, precision=precision)
        else:
            raise SystemExit(f"unknown shape {shape!r}")
        per_precision = {}
        for precision in precisions:
            for mode in modes:
                progress(f"bench generate: {shape} {precision} {mode}")
                rt = build(precision, mode)
                weights[f"{shape}-{precision}"] = rt.weight_bytes() / 2**20
                if mode == modes[0]:
                    per_precision[precision] = rt
                for ctx in contexts:
                    if ctx + args.new_tokens + 2 > cfg.max_seq_len:
                        continue
                    prompt = rng.integers(16, cfg.vocab_size, ctx).tolist()
                    for n in ns:  # warm-up: kernels compile per branch count (Triton), caches fill
                        _completion(rt, prompt[:64], n, 2, args.device)
                    for n in ns:
                        r = _completion(rt, prompt, n, args.new_tokens, args.device)
                        rows.append({"shape": shape, "layers": cfg.n_layers, "precision": precision, "attention": mode,
                                     "context": ctx, "n": n, **r})
                        progress(f"  ctx {ctx:6d} n {n:3d}: step {r['step_ms']:.2f} ms, completion "
                                 f"{r['completion_ms']:.0f} ms, peak {r['peak_mib']:.0f} MiB")
                if mode != modes[0]:
                    del rt
                if args.device == "cuda":
                    torch.cuda.empty_cache()
        if args.agreement and len(per_precision) > 1:
            texts = [rng.integers(16, cfg.vocab_size, 256).tolist() for _ in range(8)]
            if shape == "ours" and source.tokenizer is not None:
                from pathlib import Path

                import codecomplete

                src = "".join(p.read_text() for p in sorted(Path(codecomplete.__file__).parent.glob("*.py")))
                ids = source.tokenizer.encode(src)
                texts = [ids[i : i + 512] for i in range(0, min(len(ids), 512 * 16), 512)]
            agreement[shape] = _agreement(per_precision, texts)
        per_precision.clear()
    for r in rows:  # ratios against plain attention and against N=1 in the same setting
        same = [x for x in rows if x["shape"] == r["shape"] and x["precision"] == r["precision"]
                and x["context"] == r["context"]]
        plain = next((x for x in same if x["attention"] == "plain" and x["n"] == r["n"]), None)
        one = next((x for x in same if x["attention"] == r["attention"] and x["n"] == 1), None)
        if plain:
            r["speedup_vs_plain"] = plain["step_ms"] / r["step_ms"]
        if one:
            r["step_vs_n1"] = r["step_ms"] / one["step_ms"]
    result = {"benchmark": "generate", "device": args.device, "new_tokens": args.new_tokens,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "weight_mib": weights, "agreement_top1": agreement, "rows": rows}
    table = format_table(rows, ["shape", "precision", "attention", "context", "n", "step_ms", "completion_ms",
                                "peak_mib", "speedup_vs_plain", "step_vs_n1"])
    emit(result, args.json, table)
    if args.plot:
        _plot(rows, args.plot)
    return 0


def _copy_model(model):
    import copy

    return copy.deepcopy(model)


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    keys = sorted({(r["shape"], r["precision"], r["attention"], r["context"]) for r in rows})
    for key in keys:
        pts = sorted((r["n"], r["step_ms"]) for r in rows if (r["shape"], r["precision"], r["attention"], r["context"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="/".join(map(str, key)))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("candidates N")
    ax.set_ylabel("decode step (ms)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
