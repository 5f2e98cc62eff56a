"""`codecomplete eval infill|tokenalign|lines|mxeval`: quality on benchmarks and real files, as JSON."""

from __future__ import annotations

import argparse
import atexit
import platform
import sys
from dataclasses import asdict
from pathlib import Path

from codecomplete.commands import PRECISIONS
from codecomplete.eval import infill, lines, mxeval, tokenalign
from codecomplete.eval.data import DataError, resolve_data_dir
from codecomplete.eval.metrics import mean
from codecomplete.eval.programs import missing_binaries
from codecomplete.eval.runner import (
    ReferenceEngine,
    make_result,
    run_execution_benchmark,
    summary_text,
    to_json,
)
from codecomplete.request import BACK_OFF_RULES, CompletionOptions

EXIT_DATA_ERROR = 2


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `eval` and its subcommands to the top-level parser."""
    parser = subparsers.add_parser("eval", help="evaluate completion quality (JSON out, optional report)")
    sub = parser.add_subparsers(dest="eval", required=True)

    p = sub.add_parser("infill", help="HumanEval infilling: prefix + suffix in, middle out, pass@k by execution")
    p.add_argument("--benchmark", choices=list(infill.BENCHMARK_FILES), default="single-line")
    _execution_arguments(p, max_new_tokens=256)
    p.set_defaults(func=run_infill)

    p = sub.add_parser("tokenalign", help="partial-token prompts (token-alignment paper): pass@1 and first-line exact match")
    p.add_argument("--lang", choices=list(tokenalign.DATASET_PREFIX), default="python")
    p.add_argument("--split", choices=tokenalign.SPLITS, default="word")
    p.add_argument("--baseline", action="store_true", help="run the unsplit (`full`) file instead (Python only)")
    _execution_arguments(p, max_new_tokens=256)
    p.set_defaults(func=run_tokenalign)

    p = sub.add_parser("lines", help="complete the rest of a line at sampled cursors in real source files")
    p.add_argument("paths", nargs="+", help="files or directories (walked; language from the extension)")
    p.add_argument("--cursor", choices=lines.CURSOR_KINDS, default="mid-token")
    p.add_argument("--n", type=int, default=4, help="candidates per request (the oracle is best of these)")
    p.add_argument("--per-file", type=int, default=5, help="cursors sampled per file")
    _common_arguments(p, max_new_tokens=48, deadline_ms=CompletionOptions().deadline_ms, data=False)
    p.set_defaults(func=run_lines)

    p = sub.add_parser("mxeval", help="left-to-right pass@k on Multilingual HumanEval / MBXP")
    p.add_argument("--lang", choices=mxeval.LANGUAGES, default="python")
    p.add_argument("--dataset", choices=list(mxeval.DATASET_DIRS), default="humaneval")
    _execution_arguments(p, max_new_tokens=384)
    p.set_defaults(func=run_mxeval)


def _common_arguments(p: argparse.ArgumentParser, max_new_tokens: int, deadline_ms: float, data: bool = True) -> None:
    if data:
        p.add_argument("--data-dir", help="evaluation data (default: $CODECOMPLETE_DATA or ../shared/data)")
    p.add_argument("--limit", type=int, help="at most this many cases (a seeded random subset)")
    p.add_argument("--seed", type=int, default=0, help="subset, cursor and sampling seed")
    p.add_argument("--model", help="model folder (default: the shipped model)")
    p.add_argument("--runtime", default="onnx", help="onnx | torch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--deadline-ms", type=float, default=deadline_ms)
    p.add_argument("--temperature", type=float, default=CompletionOptions().temperature)
    p.add_argument("--no-align", action="store_true", help="turn token alignment off")
    p.add_argument("--no-rerank", action="store_true", help="keep the model's order (no tree-sitter rerank)")
    p.add_argument("--back-off", choices=list(BACK_OFF_RULES), default="model",
                   help="token alignment backs off only as far as a token could span the cursor (needed) or always "
                        "3 tokens (fixed); default: the model's setting (needed for the shipped model, fixed for "
                        "imported ones)")
    p.add_argument("--patience", type=int, default=4,
                   help="decode steps the sampled candidates get after the greedy one ends (-1: wait for all)")
    p.add_argument("--reference", action="store_true",
                   help="answer with the dataset's own solution instead of a model (checks the harness)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--report", metavar="DIR", help="write results.json, report.md and plots into DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--workers", type=int, default=1,
                   help="model processes generating in parallel (each loads the model; CPU threads are shared out)")


def _execution_arguments(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    _common_arguments(p, max_new_tokens=max_new_tokens, deadline_ms=60_000.0)
    p.add_argument("--samples", type=int, default=1,
                   help="candidates per problem; >1 adds pass@k (unbiased estimator over the candidates)")
    p.add_argument("--jobs", type=int, default=2, help="programs executed in parallel")


def _options(args, n: int, multiline: bool) -> CompletionOptions:
    return CompletionOptions(
        n=n, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
        align=not args.no_align, rerank=not args.no_rerank, back_off_needed=BACK_OFF_RULES[args.back_off],
        multiline=multiline, deadline_ms=args.deadline_ms,
        patience_steps=None if args.patience < 0 else args.patience,
    )


def _engine(args, cases):
    if args.reference:
        return ReferenceEngine(cases)
    if args.workers > 1:
        from codecomplete.eval.parallel import EngineSpec, ParallelEngine, threads_per_worker

        threads = threads_per_worker(args.workers) if args.device == "cpu" else 1
        engine = ParallelEngine(EngineSpec(args.model, args.runtime, args.device, threads, args.precision), args.workers)
        atexit.register(engine.close)
        return engine
    from codecomplete.engine import Engine

    return Engine.load(args.model, runtime=args.runtime, device=args.device, precision=args.precision)


def _settings(args, engine, options: CompletionOptions, **extra) -> dict:
    settings = {
        "model": "reference solutions" if args.reference else (args.model or "default"),
        "runtime": args.runtime, "device": args.device, "seed": args.seed, "limit": args.limit,
        **extra,
        "options": asdict(options),
        "python": platform.python_version(),
    }
    describe = getattr(engine, "describe", None)
    if callable(describe):
        try:
            settings["engine"] = describe()
        except Exception as e:  # a description is nice to have, never worth failing a run
            settings["engine"] = f"unavailable: {e}"
    return settings


def _sandbox_settings() -> dict:
    from codecomplete.eval.sandbox import isolation_summary

    return isolation_summary()


def _finish(args, result: dict) -> int:
    if args.report:
        from codecomplete.eval.report import write_report

        path = write_report(result, args.report)
        print(f"report: {path}", file=sys.stderr)
    print(to_json(result) if args.json else summary_text(result))
    return 0


def _data_dir(args) -> Path | None:
    try:
        return resolve_data_dir(args.data_dir)
    except DataError as e:
        print(f"codecomplete eval: {e}", file=sys.stderr)
        return None


def run_infill(args) -> int:
    data_dir = _data_dir(args)
    if data_dir is None:
        return EXIT_DATA_ERROR
    # a single-line hole is exactly one line: complete the rest of the line, as an editor does
    # at a line start; the other benchmarks fill several lines
    options = _options(args, n=args.samples, multiline=args.benchmark != "single-line")
    cases = infill.load_cases(data_dir, args.benchmark, options, args.limit, args.seed)
    engine = _engine(args, cases)
    metrics, details = run_execution_benchmark(engine, cases, infill.program_of, samples=args.samples,
                                               jobs=args.jobs, show_progress=not args.no_progress)
    settings = _settings(args, engine, options, benchmark=args.benchmark, samples=args.samples, sandbox=_sandbox_settings())
    return _finish(args, make_result(f"infill/{args.benchmark}", settings, metrics, details))


def run_tokenalign(args) -> int:
    data_dir = _data_dir(args)
    if data_dir is None:
        return EXIT_DATA_ERROR
    options = _options(args, n=args.samples, multiline=True)
    try:
        cases = tokenalign.load_cases(data_dir, args.lang, args.split, options, args.baseline, args.limit, args.seed)
    except DataError as e:
        print(f"codecomplete eval tokenalign: {e}", file=sys.stderr)
        return EXIT_DATA_ERROR
    missing = missing_binaries(args.lang)
    if missing:
        return _skip(args, f"tokenalign/{args.lang}", f"{args.lang} toolchain not installed (missing: {', '.join(missing)})")
    engine = _engine(args, cases)
    metrics, details = run_execution_benchmark(engine, cases, tokenalign.program_of, samples=args.samples, jobs=args.jobs,
                                               show_progress=not args.no_progress, extra_case_fields=tokenalign.exact_match_fields)
    metrics = {
        "pass@1": metrics.pop("pass@1"),
        "exact_match": mean(d["exact_match"] for d in details),
        "oracle_exact_match": mean(d["oracle_exact_match"] for d in details),
        **metrics,
    }
    kind = "full" if args.baseline else "sub"
    settings = _settings(args, engine, options, lang=args.lang, split=args.split, file=kind, samples=args.samples,
                         sandbox=_sandbox_settings())
    return _finish(args, make_result(f"tokenalign/{args.lang}/{args.split}/{kind}", settings, metrics, details))


def run_lines(args) -> int:
    options = _options(args, n=args.n, multiline=False)
    cases = lines.load_cases(args.paths, args.cursor, options, per_file=args.per_file, limit=args.limit, seed=args.seed)
    if not cases:
        print("codecomplete eval lines: no source files with a known language under the given paths", file=sys.stderr)
        return EXIT_DATA_ERROR
    engine = _engine(args, cases)
    metrics, details = lines.evaluate(engine, cases, show_progress=not args.no_progress)
    settings = _settings(args, engine, options, cursor=args.cursor, n=args.n, per_file=args.per_file,
                         files=len({c.request.path for c in cases}))
    return _finish(args, make_result(f"lines/{args.cursor}", settings, metrics, details))


def run_mxeval(args) -> int:
    benchmark = f"mxeval/{args.dataset}/{args.lang}"
    missing = missing_binaries(args.lang)
    if missing:
        return _skip(args, benchmark, f"{args.lang} toolchain not installed (missing on PATH: {', '.join(missing)})")
    data_dir = _data_dir(args)
    if data_dir is None:
        return EXIT_DATA_ERROR
    options = _options(args, n=args.samples, multiline=True)
    try:
        cases = mxeval.load_cases(data_dir, args.dataset, args.lang, options, args.limit, args.seed, need_reference=args.reference)
    except DataError as e:
        print(f"codecomplete eval mxeval: {e}", file=sys.stderr)
        return EXIT_DATA_ERROR
    if not cases:
        return _skip(args, benchmark, "no problems (with --reference: none ships a canonical solution)")
    engine = _engine(args, cases)
    metrics, details = run_execution_benchmark(engine, cases, mxeval.program_of, samples=args.samples,
                                               jobs=args.jobs, show_progress=not args.no_progress)
    settings = _settings(args, engine, options, dataset=args.dataset, lang=args.lang, samples=args.samples,
                         sandbox=_sandbox_settings())
    return _finish(args, make_result(benchmark, settings, metrics, details))


def _skip(args, benchmark: str, reason: str) -> int:
    """A clear message (and, with --json, an object saying so); exit 0 so a sweep over languages goes on."""
    print(f"codecomplete eval: skipped {benchmark}: {reason}", file=sys.stderr)
    if args.json:
        print(to_json({"benchmark": benchmark, "skipped": reason, "cases": 0}))
    return 0
