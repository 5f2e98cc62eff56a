"""`codecomplete complete` and `codecomplete info`: the engine from a shell, no LSP."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from codecomplete.runtime import DEVICES, RUNTIMES

PRECISIONS = ["auto", "fp32", "bf16", "fp16", "int8", "int8-s8", "int8-w7", "int8-nbits", "int4"]


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder, Hugging Face folder, .gguf file or a pulled model's name (codecomplete models list; default: the shipped model)")
    p.add_argument("--runtime", default="onnx", choices=RUNTIMES)
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="weights and kernels: auto (a GGUF keeps its precision class: 4-bit types run 4-bit, "
                        "5/6/8-bit ones int8), fp32, bf16, fp16 (torch), int8, int8-w7 (onnx: 7-bit weights), "
                        "int8-nbits (onnx: MatMulNBits; a GGUF's Q8_0/Q5_0 blocks exactly), int4 (onnx: 4-bit blocks)")


def register(sub) -> None:
    p = sub.add_parser("complete", help="complete FILE at a 0-based line and character")
    p.add_argument("file", help="source file ('-' reads standard input)")
    p.add_argument("--line", type=int, required=True, help="0-based line")
    p.add_argument("--character", type=int, required=True, help="0-based character in the line (code points)")
    p.add_argument("--language", default="", help="LSP languageId (default: from the file extension)")
    p.add_argument("--n", type=int, default=4, help="candidates to draw")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--multiline", choices=["auto", "yes", "no"], default="auto")
    p.add_argument("--deadline-ms", type=float, default=5000.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-align", action="store_true", help="no token alignment")
    p.add_argument("--no-rerank", action="store_true", help="order by log-probability only")
    p.add_argument("--json", action="store_true")
    p.add_argument("--in-process", action="store_true",
                   help="run the model in this process (default: a child process, so that a crash of the "
                        "model runtime is reported instead of ending the command)")
    p.add_argument("--engine-factory", default=None, metavar="MODULE:NAME",
                   help="for tests: a callable (model, runtime, device) -> engine instead of the real engine")
    add_model_arguments(p)
    p.set_defaults(func=run_complete)

    p = sub.add_parser("info", help="describe a model and runtime")
    add_model_arguments(p)
    p.set_defaults(func=run_info)


def line_char_to_offset(text: str, line: int, character: int) -> int:
    """Offset of a 0-based (line, character) position; ValueError when outside the text."""
    if line < 0 or character < 0:
        raise ValueError(f"negative position ({line}, {character})")
    lines = text.split("\n")
    if line >= len(lines):
        raise ValueError(f"line {line} is past the end of the file ({len(lines)} lines)")
    if character > len(lines[line]):
        raise ValueError(f"character {character} is past the end of line {line} ({len(lines[line])} characters)")
    return sum(len(x) + 1 for x in lines[:line]) + character


EXIT_RUNTIME_CRASHED = 4  # the model runtime died from a signal (the child process did)


def load_engine(model: str | None, runtime: str, device: str, precision: str = "auto"):
    """The real engine (a module-level function: a child process builds it by name)."""
    from codecomplete.engine import Engine

    return Engine.load(model, runtime=runtime, device=device, precision=precision)


def _crash_message(cause: str, while_doing: str) -> str:
    return (f"codecomplete: the model runtime crashed ({cause}) while {while_doing}; this onnxruntime or torch "
            "build may not support this CPU: try --runtime torch, --precision fp32 or another onnxruntime version")


def _load_engine(args, isolated: bool = False):
    """(engine, exit code): the engine, or None with 3 (cannot load) or 4 (the runtime crashed)."""
    from codecomplete.models.format.folder import ModelLoadError

    factory_name = getattr(args, "engine_factory", None)
    if factory_name:
        from codecomplete.isolation import import_by_name

        factory, factory_args = import_by_name(factory_name), (args.model, args.runtime, args.device)
    else:
        factory, factory_args = load_engine, (args.model, args.runtime, args.device, args.precision)
    try:
        if not isolated:
            return factory(*factory_args), 0
        from codecomplete.isolation import EngineCrashed, ProcessEngine

        try:
            return ProcessEngine(factory, factory_args, label=args.model or "the default model", restart=False), 0
        except EngineCrashed as e:
            print(_crash_message(e.cause, "loading the model"), file=sys.stderr)
            return None, EXIT_RUNTIME_CRASHED
    except (ModelLoadError, RuntimeError, ValueError, OSError) as e:
        print(f"codecomplete: cannot load the model: {e}", file=sys.stderr)
        return None, 3


def run_complete(args) -> int:
    from codecomplete.request import CompletionOptions, CompletionRequest

    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        print(f"codecomplete: cannot read {args.file}: {e}", file=sys.stderr)
        return 2
    try:
        offset = line_char_to_offset(text, args.line, args.character)
    except ValueError as e:
        print(f"codecomplete: {e}", file=sys.stderr)
        return 2
    engine, code = _load_engine(args, isolated=not args.in_process and os.name == "posix")
    if engine is None:
        return code
    multiline = {"auto": None, "yes": True, "no": False}[args.multiline]
    opts = CompletionOptions(n=args.n, max_new_tokens=args.max_tokens, deadline_ms=args.deadline_ms, seed=args.seed,
                             align=not args.no_align, rerank=not args.no_rerank, multiline=multiline)
    request = CompletionRequest(text=text, offset=offset, language=args.language,
                                path="" if args.file == "-" else args.file, options=opts)
    try:
        completion = engine.complete(request)
    finally:
        if hasattr(engine, "close"):
            engine.close()
    if completion is None:  # only a child-process engine answers None: it crashed or raised
        if getattr(engine, "state", "") == "error":
            print(_crash_message(engine.last_crash or "unknown cause", "completing"), file=sys.stderr)
            return EXIT_RUNTIME_CRASHED
        print(f"codecomplete: the completion failed: {getattr(engine, 'last_error', '') or 'no answer'}",
              file=sys.stderr)
        return 1
    if args.json:
        out = {"candidates": [{"text": c.text, "score": c.score, "logprob": c.logprob, "syntax_ok": c.syntax_ok,
                               "score_parts": c.score_parts, "tokens": c.tokens, "stop_reason": c.stop_reason}
                              for c in completion.candidates],
               "timings_ms": {k: round(v, 3) for k, v in completion.timings_ms.items()},
               "tokens_generated": completion.tokens_generated, "model_calls": completion.model_calls,
               "model": engine.describe()}
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not completion.candidates:
        print("(no completion)")
    for i, c in enumerate(completion.candidates):
        flag = "" if c.syntax_ok else "  [syntax]"
        print(f"--- #{i + 1}  score {c.score:.3f}  logprob {c.logprob:.3f}{flag}")
        print(c.text)
    total = completion.timings_ms.get("total", 0.0)
    print(f"--- {total:.0f} ms ({engine.describe()['runtime']})", file=sys.stderr)
    return 0


def run_info(args) -> int:
    engine, code = _load_engine(args)
    if engine is None:
        return code
    cfg = engine.runtime.config
    json.dump({**engine.describe(), "config": cfg.to_dict()}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
