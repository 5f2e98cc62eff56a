"""Typing replay: one completion request per keystroke through the engine (or the real
LSP server with --lsp), cold and warm latency percentiles and where the time goes."""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

from codecomplete.bench.common import (
    TYPING_SAMPLE,
    bench_prompt_path,
    emit,
    format_table,
    percentile,
    progress,
)
from codecomplete.commands import PRECISIONS
from codecomplete.request import BACK_OFF_RULES
from codecomplete.runtime import DEVICES, RUNTIMES

DEFAULT_FILE = TYPING_SAMPLE


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", default=str(DEFAULT_FILE), help="source file to type through")
    p.add_argument("--language", default="", help="LSP languageId (default: from the extension)")
    p.add_argument("--keystrokes", type=int, default=60)
    p.add_argument("--cold", type=int, default=5, help="cold requests (fresh caches, full prompt)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the whole replay this many times from clean engines; percentiles pool all "
                        "runs, `runs` lists each run's p50s (this machine's speed drifts between runs)")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--deadline-ms", type=float, default=2000.0)
    p.add_argument("--prompt-tokens", type=int, default=1024, help="prefix + suffix token budget")
    p.add_argument("--patience", default="4",
                   help="decode steps the sampled candidates get after the greedy one ends (-1: wait for all); "
                        "several, comma-separated, are compared")
    p.add_argument("--start", type=int, default=None, help="character offset where typing begins")
    p.add_argument("--model", default=None,
                   help="model folder (default: the shipped model); several, comma-separated, are compared")
    p.add_argument("--runtime", default="onnx", choices=RUNTIMES)
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--precision", default="auto",
                   help="precisions to compare, comma-separated: auto, int8, int8-w7 (7-bit weights), fp32, ...")
    p.add_argument("--threads", default="adaptive",
                   help="onnx thread policies to compare, comma-separated: adaptive (all cores, spinning "
                        "while computing; one thread while other programs keep the CPU busy), spin, nospin "
                        "(all cores, workers sleep between ops), single (one thread)")
    p.add_argument("--busy", type=int, default=0, metavar="K",
                   help="keep K other processes spinning during the replay (typing while a build runs)")
    p.add_argument("--back-off", default="model",
                   help="token-alignment back-off to compare, comma-separated: model (the model's own setting), "
                        "needed (only as far as a token could span the cursor), fixed (always the last 3 tokens, "
                        "as in the paper)")
    p.add_argument("--reuse", default="on",
                   help="reuse of the last keystroke's work to compare, comma-separated: on (the logits of an "
                        "unchanged prompt, the KV and logits of the branches it decoded), off (prefill and "
                        "decode every keystroke)")
    p.add_argument("--isolation", default="inprocess",
                   help="where the engine runs, comma-separated to compare: inprocess (this process), process "
                        "(a child process, as the language server runs it: each request and answer cross a pipe)")
    p.add_argument("--lsp", action="store_true", help="also replay through the real server over stdio")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None, help="write a latency-per-keystroke PNG")


def _language(path: str, language: str) -> str:
    if language:
        return language
    from codecomplete.languages import language_for

    lang = language_for("", path)
    return lang.id if lang else ""


def default_start(text: str, keystrokes: int) -> int:
    """A line start past the middle of the file with room for the keystrokes after it."""
    target = min(len(text) - keystrokes - 1, max(0, len(text) * 2 // 3))
    start = text.rfind("\n", 0, max(target, 0)) + 1
    return max(0, start)


def _stage_shares(completions) -> dict[str, float]:
    totals: dict[str, float] = {}
    for c in completions:
        for k, v in c.timings_ms.items():
            if k != "total":
                totals[k] = totals.get(k, 0.0) + v
    whole = sum(c.timings_ms.get("total", 0.0) for c in completions) or 1.0
    return {k: round(v / whole, 4) for k, v in sorted(totals.items())}


def replay_engines(engines: dict, text: str, path: str, language: str, start: int, keystrokes: int,
                   opts_kwargs: dict, cold: int, repeat: int = 1) -> dict[str, dict]:
    """Cold requests at several positions, then one request per typed character, for each
    engine: every request goes to each engine in turn (the order alternating), so a machine
    whose speed drifts treats them alike. repeat > 1 runs the whole replay that many times
    from clean engines (the same work each time): the percentiles pool every run's requests,
    and `runs` has each run's own p50s."""
    from codecomplete.request import CompletionOptions, CompletionRequest

    end = min(len(text), start + keystrokes)
    suffix = text[end:]
    names = list(engines)

    def request(offset: int, doc_end_suffix: str) -> CompletionRequest:
        doc = text[:offset] + doc_end_suffix
        return CompletionRequest(text=doc, offset=offset, language=language, path=path,
                                 options=CompletionOptions(**opts_kwargs))

    def in_turn(i: int) -> list[str]:
        return names if i % 2 == 0 else names[::-1]

    cold_ms: dict[str, list[float]] = {n: [] for n in names}
    runs = {n: ([], [], [], []) for n in names}  # warm, cached, other, per keystroke
    run_p50s: dict[str, list[dict]] = {n: [] for n in names}
    positions = [max(1, int(len(text) * f)) for f in (0.55, 0.65, 0.75, 0.85, 0.95)][:cold]
    for run in range(repeat):
        marks = {n: (len(cold_ms[n]), len(runs[n][0])) for n in names}
        for i, pos in enumerate(positions):
            for name in in_turn(i):
                engine = engines[name]
                engine.forget()
                t0 = time.perf_counter()
                engine.complete(request(pos, text[pos:]))
                cold_ms[name].append((time.perf_counter() - t0) * 1000)
        for engine in engines.values():
            engine.forget()
            engine.complete(request(start, suffix))  # the file is open: the first keystroke's prompt is cached
        for offset in range(start + 1, end + 1):
            for name in in_turn(offset):
                warm, cached, other, per_key = runs[name]
                t0 = time.perf_counter()
                c = engines[name].complete(request(offset, suffix))
                ms = (time.perf_counter() - t0) * 1000
                kind = c.source
                per_key.append({"run": run, "offset": offset, "ms": ms, "kind": kind, "new_tokens": c.prefill_new_tokens})
                (cached if kind == "cache" else warm if kind == "warm" else other).append((ms, c))
        for n in names:
            run_p50s[n].append({"warm_p50_ms": percentile([m for m, _ in runs[n][0][marks[n][1]:]], 50),
                                "cold_p50_ms": percentile(cold_ms[n][marks[n][0]:], 50)})
    out = {}
    for name, (warm, cached, other, per_key) in runs.items():
        warm_ms, cold = [m for m, _ in warm], cold_ms[name]
        out[name] = {
            "cold_p50_ms": percentile(cold, 50), "cold_p95_ms": percentile(cold, 95),
            "warm_p50_ms": percentile(warm_ms, 50), "warm_p95_ms": percentile(warm_ms, 95),
            "cache_p50_ms": percentile([m for m, _ in cached], 50),
            "cache_hit_rate": len(cached) / max(1, len(per_key)),
            "requests": len(per_key), "warm_requests": len(warm), "cold_requests": len(cold),
            "uncached_cold_keystrokes": len(other),
            "warm_prefill_new_tokens_p50": statistics.median([c.prefill_new_tokens for _, c in warm]) if warm else None,
            # keystrokes that ran no prefill call: the prompt was the last one (typing inside a
            # word the back-off removes), or it went on with tokens a candidate branch was fed
            "warm_unchanged_prompt": sum(c.prefill_new_tokens == 0 and not c.prefill_adopted_tokens for _, c in warm),
            "warm_continued_branch": sum(c.prefill_adopted_tokens > 0 for _, c in warm),
            "warm_tokens_generated_mean": statistics.fmean([c.tokens_generated for _, c in warm]) if warm else None,
            "warm_model_calls_mean": statistics.fmean([c.model_calls for _, c in warm]) if warm else None,
            # decode rows computed against one per candidate and step: the share saved by
            # candidates with equal tokens sharing a row
            "warm_decode_rows_ratio": (sum(c.decode_rows for _, c in warm) / sum(c.branch_rows for _, c in warm)
                                       if warm and any(c.branch_rows for _, c in warm) else None),
            "stages": _stage_shares([c for _, c in warm]),
            **({"runs": run_p50s[name]} if repeat > 1 else {}),
            "keystrokes": per_key,
        }
    return out


def policy_ratios(first: dict, other: dict) -> dict:
    """p50 ratios to the first policy, and the median of per-keystroke ratios (the same
    keystroke, warm under both: robust to which keystrokes ran the model)."""
    base = {(k["run"], k["offset"]): k["ms"] for k in first["keystrokes"] if k["kind"] == "warm"}
    paired = [(k["ms"], base[k["run"], k["offset"]]) for k in other["keystrokes"]
              if k["kind"] == "warm" and (k["run"], k["offset"]) in base]
    # every keystroke that took the same path under both (cache hits too): the fixed cost per request
    same_kind = {(k["run"], k["offset"]): k for k in first["keystrokes"]}
    paired_any = [k["ms"] - same_kind[k["run"], k["offset"]]["ms"] for k in other["keystrokes"]
                  if (k["run"], k["offset"]) in same_kind and same_kind[k["run"], k["offset"]]["kind"] == k["kind"]]
    ratio = lambda a, b: a / b if a and b else None  # noqa: E731
    return {"warm_p50_ratio": ratio(other["warm_p50_ms"], first["warm_p50_ms"]),
            "cold_p50_ratio": ratio(other["cold_p50_ms"], first["cold_p50_ms"]),
            "warm_paired_ratio_p50": statistics.median([a / b for a, b in paired]) if paired else None,
            "warm_paired_delta_p50_ms": statistics.median([a - b for a, b in paired]) if paired else None,
            "paired_delta_p50_ms": statistics.median(paired_any) if paired_any else None,
            "paired_keystrokes": len(paired_any)}


THREAD_POLICIES = {"adaptive": {}, "spin": {"spin": True}, "nospin": {"spin": False}, "single": {"threads": 1}}
ISOLATIONS = ("inprocess", "process")


def load_engine(args, policy: str, precision: str = "auto", model: str | None = None, isolation: str = "inprocess"):
    """The engine for one model, thread policy and precision (the torch runtime has one
    policy: its own); model None is the shipped one. isolation "process": built in a child
    process and called through the pipe, as the language server does."""
    if isolation == "process":
        from codecomplete.isolation import ProcessEngine

        return ProcessEngine(build_engine, (args.runtime, args.device, policy, precision, model),
                             label=model or "the default model", restart=False)
    return build_engine(args.runtime, args.device, policy, precision, model)


def build_engine(runtime: str, device: str, policy: str, precision: str, model: str | None):
    """load_engine's work in plain values (a child process calls it by name)."""
    from codecomplete.engine import Engine

    if runtime != "onnx" or policy == "adaptive":
        return Engine.load(model, runtime=runtime, device=device, precision=precision)
    from codecomplete.models.format.source import load_model_source
    from codecomplete.runtime.onnx import OnnxRuntime, physical_cores

    kwargs = {"threads": physical_cores(), **THREAD_POLICIES[policy]}
    return Engine(OnnxRuntime(load_model_source(model, precision=precision), device=device, precision=precision, **kwargs))


def _variant_values(flag: str, value: str, choices) -> list[str]:
    """The comma-separated values of a variant flag, each one of `choices` (None: whole
    numbers, written back in their plain form); a clear exit otherwise."""
    values = [v.strip() for v in value.split(",") if v.strip()]
    if choices is None:
        try:
            values = [str(int(v)) for v in values]
        except ValueError:
            values = []
        wanted = "whole numbers"
    else:
        values = values if all(v in choices for v in values) else []
        wanted = ", ".join(choices)
    if not values:
        raise SystemExit(f"bench latency: {flag} {value!r}: choose from {wanted} (comma-separated to compare)")
    return values


def variant_names(*dims: list[str]) -> dict[str, tuple[str, ...]]:
    """Engine name -> one value per dimension (thread policy, precision, back-off): the
    dimensions with more than one value name it."""
    import itertools

    varied = [i for i, d in enumerate(dims) if len(d) > 1]
    return {"/".join(combo[i] for i in varied) or combo[0]: combo for combo in itertools.product(*dims)}


class WithOptions:
    """An engine whose requests get some options replaced (a variant of the same engine)."""

    def __init__(self, engine, **options):
        self.engine, self.options = engine, options

    def complete(self, request):
        return self.engine.complete(replace(request, options=replace(request.options, **self.options)))

    def __getattr__(self, name):
        return getattr(self.engine, name)


def _spin_forever() -> None:
    while True:
        pass


class BackgroundLoad:
    """K processes that keep a core each busy until the block ends."""

    def __init__(self, k: int):
        self.k, self.procs = k, []

    def __enter__(self):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.procs = [ctx.Process(target=_spin_forever, daemon=True) for _ in range(self.k)]
        for proc in self.procs:
            proc.start()
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.join()


def run(args) -> int:
    policies = _variant_values("--threads", args.threads, THREAD_POLICIES)
    if args.runtime != "onnx" and policies != ["adaptive"]:
        raise SystemExit("bench latency: --threads compares onnxruntime thread policies; the torch runtime has one")
    precisions = _variant_values("--precision", args.precision, PRECISIONS)
    back_offs = _variant_values("--back-off", args.back_off, BACK_OFF_RULES)
    reuses = _variant_values("--reuse", args.reuse, ("on", "off"))
    patiences = _variant_values("--patience", args.patience, None)
    isolations = _variant_values("--isolation", args.isolation, ISOLATIONS)
    # model folder by its name in the report; "default" is the shipped model unless given
    folders = {m: m for m in (x.strip() for x in (args.model or "").split(",")) if m} or {"default": None}
    models = list(folders)
    if args.repeat < 1:
        raise SystemExit("bench latency: --repeat must be at least 1")
    compared = {"--precision": (precisions, "auto"), "--back-off": (back_offs, "model"), "--reuse": (reuses, "on"),
                "--patience": (patiences, "4"), "--model": (models[1:], None),
                "--isolation": (isolations, "inprocess")}
    if args.lsp and any(values and values != [default] for values, default in compared.values()):
        raise SystemExit("bench latency: --lsp replays the server with its own settings; "
                         f"compare {', '.join(compared)} without it")
    variants = variant_names(models, policies, precisions, back_offs, reuses, patiences, isolations)

    path = str(Path(args.file))
    text = Path(path).read_text(encoding="utf-8")
    language = _language(path, args.language)
    start = args.start if args.start is not None else default_start(text, args.keystrokes)
    suffix_budget = args.prompt_tokens // 4
    opts = dict(n=args.n, max_new_tokens=args.max_tokens, deadline_ms=args.deadline_ms, multiline=False,
                prefix_tokens=args.prompt_tokens - suffix_budget, suffix_tokens=suffix_budget)
    progress(f"bench latency: loading {', '.join(models)} ({args.runtime}, {args.device})")
    result = {"benchmark": "latency", "file": path, "language": language,
              "settings": {**opts, "start": start, "patience": [int(x) for x in patiences]}, "busy_processes": args.busy}
    engines, loaded = {}, {}
    with BackgroundLoad(args.busy):
        for name, (model, policy, precision, back, reuse, patience, isolation) in variants.items():
            t0 = time.perf_counter()
            steps = int(patience)
            engine = load_engine(args, policy, precision, folders[model], isolation)
            engines[name] = WithOptions(engine, back_off_needed=BACK_OFF_RULES[back],
                                        patience_steps=None if steps < 0 else steps)
            engines[name].engine.reuse_keystrokes = reuse == "on"
            loaded[name] = (time.perf_counter() - t0) * 1000
            progress(f"  {name}: loaded in {loaded[name]:.0f} ms")
        progress(f"  replaying {args.keystrokes} keystrokes of {path}" + (", engines in turn" if len(variants) > 1 else ""))
        try:
            replays = replay_engines(engines, text, bench_prompt_path(path), language, start, args.keystrokes,
                                     opts, args.cold, repeat=args.repeat)
            by_policy = {p: {"model": engines[p].describe(), "load_ms": loaded[p], **replays[p]} for p in variants}
        finally:
            for engine in engines.values():
                if hasattr(engine.engine, "close"):
                    engine.engine.close()  # a child process
    del engines
    first = by_policy[next(iter(variants))]
    result.update({"model": first["model"], "load_ms": first["load_ms"],
                   "engine": {k: v for k, v in first.items() if k not in ("model", "load_ms")}})
    if len(variants) > 1:  # side by side, as ratios to the first engine
        varied = [k for k, d in (("models", models), ("threads", policies), ("precision", precisions),
                                 ("back_off", back_offs), ("reuse", reuses), ("patience", patiences),
                                 ("isolation", isolations)) if len(d) > 1]
        key = varied[0] if len(varied) == 1 else "variants"
        result[key] = {p: {"warm_p50_ms": r["warm_p50_ms"], "cold_p50_ms": r["cold_p50_ms"],
                           **policy_ratios(first, r), "warm_requests": r["warm_requests"],
                           "warm_model_calls_mean": r["warm_model_calls_mean"],
                           "warm_unchanged_prompt": r["warm_unchanged_prompt"],
                           "warm_continued_branch": r["warm_continued_branch"],
                           "requests": r["requests"], "model": r["model"]}
                       for p, r in by_policy.items()}
    flat = {k: v for k, v in result["engine"].items() if k != "keystrokes"}
    result.update({k: v for k, v in flat.items()})  # top-level keys for quick reading
    keys = ("warm_p50_ms", "warm_p95_ms", "cold_p50_ms", "cold_p95_ms", "cache_hit_rate")
    rows = [{"path": f"engine ({p})", **{k: r[k] for k in keys}} for p, r in by_policy.items()]
    if args.lsp:
        from codecomplete.lsp.replay import run_lsp_replay

        progress("  replaying through the language server over stdio")
        lsp = run_lsp_replay(path, language, args.n, args.max_tokens, args.keystrokes, model=args.model,
                             runtime=args.runtime, device=args.device, deadline_ms=int(args.deadline_ms),
                             multiline="never", start=start, keep_suffix=True)
        result["lsp"] = lsp
        cache = lsp["by_source"].get("cache", {})
        rows.append({"path": "lsp", "warm_p50_ms": lsp["warm_p50_ms"], "warm_p95_ms": lsp["warm_p95_ms"],
                     "cold_p50_ms": None, "cold_p95_ms": None,
                     "cache_hit_rate": cache.get("count", 0) / max(1, lsp["requests"])})
        # like for like: keystrokes where the model ran with its prefix KV reused, on both paths
        result["lsp_minus_engine_warm_p50_ms"] = lsp["warm_p50_ms"] - flat["warm_p50_ms"]
        result["lsp_cache_p50_ms"] = cache.get("p50_ms")
        # the same keystrokes, warm on both paths: the server's overhead without the noise of
        # which keystrokes happened to run the model
        engine_ms = {k["offset"]: k["ms"] for k in result["engine"]["keystrokes"] if k["kind"] == "warm" and k["run"] == 0}
        paired = [k["ms"] - engine_ms[k["offset"]] for k in lsp["keystrokes"]
                  if k["source"] == "warm" and k["offset"] in engine_ms]
        result["lsp_minus_engine_warm_paired_p50_ms"] = percentile(paired, 50)
        result["lsp_warm_paired_keystrokes"] = len(paired)
    emit(result if args.json else {k: v for k, v in result.items() if k not in ("engine", "lsp")}, args.json,
         format_table(rows, list(rows[0].keys())))
    if args.plot:
        _plot([k for k in result["engine"]["keystrokes"] if k["run"] == 0], args.plot)
    return 0


def _plot(per_key: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    colors = {"warm": "tab:blue", "cache": "tab:green", "cold": "tab:red"}
    for kind, color in colors.items():
        pts = [(i, k["ms"]) for i, k in enumerate(per_key) if k["kind"] == kind]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, color=color, label=kind)
    ax.set_xlabel("keystroke")
    ax.set_ylabel("ms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
