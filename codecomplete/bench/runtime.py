"""Runtimes side by side: prefill and decode-step milliseconds and resident memory.

Each runtime is measured in a fresh subprocess (so its RSS is its own) on the same
weights: the given model, the shipped default, or random weights of a preset shape.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import emit, format_table, progress, rss_mb

RUNTIMES = ("torch-fp32", "torch-int8", "onnx-fp32", "onnx-int8")
# extra onnx int8 kernels, for comparing them (see runtime/onnx_graph.py LINEAR_KINDS)
EXTRA_RUNTIMES = ("onnx-int8-s8", "onnx-int8-nbits", "onnx-int8-w7", "onnx-auto")  # auto: what a user gets
BASELINE = "torch-fp32"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--model", help="model folder (default: the shipped model, else --preset random weights)")
    parser.add_argument("--preset", help="measure random weights of this preset shape (e.g. base-42m); "
                        "the default when neither --model nor the shipped model exists")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES),
                        help=f"comma-separated, from {', '.join(RUNTIMES + EXTRA_RUNTIMES)}")
    parser.add_argument("--prefill-tokens", default="256,2048", help="prompt lengths (capped at the model context)")
    parser.add_argument("--decode-context", type=int, default=1024, help="context tokens under the decode steps")
    parser.add_argument("--decode-n", default="1,4", help="branch counts for the decode step")
    parser.add_argument("--decode-steps", type=int, default=16, help="steps per timed decode run")
    parser.add_argument("--repeat", type=int, default=3, help="timed prefill runs per figure")
    parser.add_argument("--decode-repeat", type=int, default=8, help="timed decode runs per figure")
    parser.add_argument("--threads", type=int, default=0, help="threads per runtime (0: physical cores)")
    parser.add_argument("--plot", help="write a bar chart to this PNG")
    parser.add_argument("--agreement", type=int, default=0, metavar="POSITIONS",
                        help="also score each runtime's next-token distribution against the first one's "
                             "(top-1 agreement, KL) at up to this many positions of code, at most 24 per file "
                             "(this package's sources, or --agreement-files)")
    parser.add_argument("--agreement-files", nargs="*", default=None, help="source files for --agreement")


def resolve_model(args: argparse.Namespace, workdir: Path) -> tuple[Path, str]:
    """The model folder to measure, and a note on where it came from."""
    from codecomplete.models.format.folder import is_model_folder
    from codecomplete.models.format.source import default_model_dir

    if args.model:
        return Path(args.model), "given"
    if not args.preset and is_model_folder(default_model_dir()):
        return default_model_dir(), "shipped default"
    name = args.preset or "base-42m"
    return random_model_folder(workdir / name, name), f"random weights, preset {name}"


def random_model_folder(path: Path, preset_name: str) -> Path:
    """An int8 model folder with random weights (GPT-2 scale) of a preset shape."""
    from codecomplete.models.format.config import preset
    from codecomplete.models.format.folder import save_model_folder
    from codecomplete.models.testing import random_weights, train_test_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    cfg = preset(preset_name)
    tokenizer = train_test_tokenizer(path / "tokenizer.json")  # ids are random anyway
    save_model_folder(path, cfg, random_weights(cfg, seed=0, std=0.02), tokenizer, int8=True)
    return path


def load(name: str, model_dir: Path, threads: int):
    """A runtime by bench name, e.g. onnx-int8 or onnx-int8-s8."""
    from codecomplete.models.format.source import load_model_source

    kind, _, precision = name.partition("-")
    source = load_model_source(model_dir, precision=precision)
    if kind == "torch":
        from codecomplete.runtime.torch import TorchRuntime

        return TorchRuntime(source, precision=precision, threads=threads)
    from codecomplete.runtime.onnx import OnnxRuntime

    if precision == "auto":  # the default: a GGUF's own precision class, this CPU's int8 kind
        return OnnxRuntime(source, precision="auto", threads=threads)
    linear_kind = precision
    return OnnxRuntime(source, precision=precision.split("-")[0], threads=threads, linear_kind=linear_kind)


def time_ms(fn, repeat: int, warmup: int = 1) -> dict:
    """Wall milliseconds of fn(): median and min (the min is the figure to trust on a busy
    machine: other processes only ever add time), and the median CPU milliseconds of this
    process (robust to a busy machine with --threads 1; with more threads it counts
    spinning workers too)."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append((time.perf_counter() - t0) * 1000.0)
        cpu.append((time.process_time() - c0) * 1000.0)
    return {"ms": statistics.median(wall), "ms_min": min(wall), "cpu_ms": statistics.median(cpu)}


def measure(name: str, model_dir: Path, spec: dict) -> list[dict]:
    """Rows for one runtime (run inside the worker subprocess)."""
    import numpy as np

    c0, t0 = time.process_time(), time.perf_counter()
    rt = load(name, model_dir, spec["threads"])
    load_ms = (time.perf_counter() - t0) * 1000.0
    rows = [{"runtime": name, "stage": "load", "tokens": 0, "n": 0, "ms": load_ms, "ms_min": load_ms,
             "cpu_ms": (time.process_time() - c0) * 1000.0}]
    cfg = rt.config
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, cfg.max_seq_len).tolist()
    for t in spec["prefill_tokens"]:
        t = min(t, cfg.max_seq_len)
        repeat = spec["repeat"] if t <= 512 else max(1, spec["repeat"] - 1)
        rows.append({"runtime": name, "stage": "prefill", "tokens": t, "n": 1,
                     **time_ms(lambda t=t: rt.prefill(ids[:t]), repeat)})
    steps = spec["decode_steps"]
    context = min(spec["decode_context"], cfg.max_seq_len - steps)
    state, _ = rt.prefill(ids[:context])
    for n in spec["decode_n"]:
        def run_steps(n=n):
            branches = rt.start_branches(state, n, steps)
            for i in range(steps):
                rt.decode(state, branches, ids[i : i + n] if n > 1 else [ids[i]])
        per_run = time_ms(run_steps, spec["decode_repeat"])
        rows.append({"runtime": name, "stage": "decode", "tokens": context, "n": n,
                     **{k: v / steps for k, v in per_run.items()}})
    if spec.get("agreement_out"):
        np.save(Path(spec["agreement_out"]) / f"{name}.npy", logits_at(rt, spec["agreement_docs"]))
    rss = rss_mb()
    for row in rows:
        row["rss_mb"] = round(rss, 1)
        for key in ("ms", "ms_min", "cpu_ms"):
            row[key] = round(row[key], 3)
    return rows


def agreement_docs(tokenizer, files: list[Path], positions: int, start: int = 128, stride: int = 8,
                   per_file: int = 24) -> list[tuple[list[int], list[int]]]:
    """(token ids, prompt lengths to score) per file: every stride-th token after the first
    start, at most per_file of them, until `positions` in all."""
    docs, left = [], positions
    for path in files:
        if left <= 0:
            break
        ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
        cuts = list(range(start, len(ids), stride))[: min(per_file, left)]
        if cuts:
            docs.append((ids[: cuts[-1]], cuts))
            left -= len(cuts)
    return docs


def logits_at(rt, docs: list[tuple[list[int], list[int]]]):
    """Next-token logits after each prompt length (the prompt KV reused between them)."""
    import numpy as np

    out = []
    for ids, cuts in docs:
        state = None
        for cut in cuts:
            state, logits = rt.prefill(ids[:cut], state)
            out.append(np.asarray(logits, np.float32))
    return np.stack(out)


def agreement(reference, other) -> dict:
    """Top-1 agreement and mean KL(reference || other) of two (positions, vocab) logit arrays."""
    import numpy as np

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = log_softmax(reference.astype(np.float64)), log_softmax(other.astype(np.float64))
    return {"top1": round(float((reference.argmax(-1) == other.argmax(-1)).mean()), 4),
            "kl": round(float((np.exp(p) * (p - q)).sum(-1).mean()), 5), "positions": int(len(reference))}


def default_agreement_files() -> list[Path]:
    """This package's own Python sources, largest first."""
    root = Path(__file__).resolve().parents[1]
    return sorted(root.rglob("*.py"), key=lambda p: (-p.stat().st_size, str(p)))


def run_worker(name: str, model_dir: Path, spec: dict) -> tuple[list[dict], str | None]:
    """Measure one runtime in a fresh Python process."""
    # -P: a checkout's codecomplete/ folder in the working directory must not shadow the package
    cmd = [sys.executable, "-P", "-m", "codecomplete.bench.runtime", "--worker", name, str(model_dir)]
    done = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True)  # the spec may be long
    if done.returncode != 0:
        return [], f"{name} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
    return json.loads(done.stdout.strip().splitlines()[-1]), None


def add_ratios(rows: list[dict]) -> None:
    """speedup_vs_torch_fp32: the torch-fp32 time of the same figure over this one (of
    the medians; speedup_min_... of the minima, cpu_speedup_... of the CPU times)."""
    for stat, label in (("ms", "speedup_vs_torch_fp32"), ("ms_min", "speedup_min_vs_torch_fp32"),
                        ("cpu_ms", "cpu_speedup_vs_torch_fp32")):
        base = {(r["stage"], r["tokens"], r["n"]): r[stat] for r in rows if r["runtime"] == BASELINE}
        for r in rows:
            key = (r["stage"], r["tokens"], r["n"])
            if key in base and r[stat] > 0:
                r[label] = round(base[key] / r[stat], 2)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = sorted({(r["stage"], r["tokens"], r["n"]) for r in rows if r["stage"] != "load"})
    names = list(dict.fromkeys(r["runtime"] for r in rows))
    fig, axes = plt.subplots(1, len(figures), figsize=(3.2 * len(figures), 3.6))
    for ax, (stage, tokens, n) in zip(axes if len(figures) > 1 else [axes], figures, strict=True):
        ms = [next((r["ms"] for r in rows if r["runtime"] == name and (r["stage"], r["tokens"], r["n"]) == (stage, tokens, n)), 0)
              for name in names]
        ax.bar(range(len(names)), ms, color=["#999" if x.startswith("torch") else "#3a7" for x in names])
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{stage} {tokens} tok" + (f", N={n}" if stage == "decode" else ""), fontsize=9)
        ax.set_ylabel("ms")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args: argparse.Namespace) -> int:
    from codecomplete.runtime.onnx import physical_cores

    names = [x.strip() for x in args.runtimes.split(",") if x.strip()]
    unknown = [x for x in names if x not in RUNTIMES + EXTRA_RUNTIMES]
    if unknown:
        print(f"unknown runtimes: {', '.join(unknown)}", file=sys.stderr)
        return 2
    notes = []
    if importlib.util.find_spec("torch") is None:
        notes.append("torch is not installed: torch rows skipped")
        names = [x for x in names if not x.startswith("torch")]
    spec = {"prefill_tokens": [int(x) for x in args.prefill_tokens.split(",")],
            "decode_n": [int(x) for x in args.decode_n.split(",")], "decode_context": args.decode_context,
            "decode_steps": args.decode_steps, "repeat": args.repeat, "decode_repeat": args.decode_repeat,
            "threads": args.threads or physical_cores()}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, origin = resolve_model(args, Path(tmp))
        progress(f"bench runtime: {model_dir.name} ({origin}), {spec['threads']} threads")
        from codecomplete.models.format.folder import is_model_folder, open_model_folder
        from codecomplete.models.format.source import load_model_source

        source = None
        if args.agreement > 0:
            source = load_model_source(model_dir)
            files = [Path(f) for f in args.agreement_files] if args.agreement_files else default_agreement_files()
            spec["agreement_docs"] = agreement_docs(source.tokenizer, files, args.agreement)
            spec["agreement_out"] = tmp
        rows = []
        for name in names:
            progress(f"  {name} ...")
            got, error = run_worker(name, model_dir, spec)
            rows += got
            if error:
                notes.append(error)
        if source is not None:
            config = source.config
        elif is_model_folder(model_dir):
            config = open_model_folder(model_dir).config
        else:  # a .gguf file or a Hugging Face folder
            config = load_model_source(model_dir).config
        scores = {}
        if args.agreement > 0:
            import numpy as np

            measured = [n for n in names if (Path(tmp) / f"{n}.npy").exists()]
            if measured:
                reference = np.load(Path(tmp) / f"{measured[0]}.npy")
                scores = {"reference": measured[0],
                          **{n: agreement(reference, np.load(Path(tmp) / f"{n}.npy")) for n in measured[1:]}}
    add_ratios(rows)
    result = {"model": {"origin": origin, "path": None if origin.startswith("random") else str(model_dir),
                        "params_m": round(config.n_params() / 1e6, 1), "vocab": config.vocab_size,
                        "dim": config.dim, "layers": config.n_layers, "heads": config.n_heads,
                        "kv_heads": config.n_kv_heads, "max_seq_len": config.max_seq_len},
              "threads": spec["threads"], "rows": rows, "notes": notes}
    if scores:
        result["agreement"] = scores
    if args.plot and rows:
        plot(rows, args.plot)
    columns = ["runtime", "stage", "tokens", "n", "ms", "ms_min", "cpu_ms", "speedup_vs_torch_fp32",
               "speedup_min_vs_torch_fp32", "cpu_speedup_vs_torch_fp32", "rss_mb"]
    emit(result, args.json, format_table(rows, columns) if rows else None)
    return 0 if rows else 1


def _worker_main(argv: list[str]) -> int:
    name, model_dir, spec = argv[0], Path(argv[1]), json.loads(sys.stdin.read())
    print(json.dumps(measure(name, model_dir, spec)))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2:]))
    parser = argparse.ArgumentParser(prog="codecomplete bench runtime")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
