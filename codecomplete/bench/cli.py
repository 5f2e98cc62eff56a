"""`codecomplete bench <name>`: each benchmark module has add_arguments(parser) and run(args)."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "attention": "codecomplete.bench.attention",  # one decode step, plain vs bifurcated
    "runtime": "codecomplete.bench.runtime",  # torch/onnx x fp32/int8 prefill and decode
    "latency": "codecomplete.bench.latency",  # typing replay through the engine or the LSP
    "soak": "codecomplete.bench.soak",  # a fixed-pace typing replay for a while: latency drift, RSS, backlog
    "generate": "codecomplete.bench.generate",  # N-candidate generation end to end (CUDA)
    "decode": "codecomplete.bench.decode",  # the batched, graph-captured decode step: checks, step time vs floor
    "varlen": "codecomplete.bench.varlen",  # the varlen decode kernel's launch shape, swept per batched step
    "llamacpp": "codecomplete.bench.llamacpp",  # side by side with llama.cpp on the same GGUF file
    "host": "codecomplete.bench.host",  # the host's Python per request-step over a free runtime
    "serve": "codecomplete.bench.serve",  # simulated users typing against the team server over HTTP
    "llamaserver": "codecomplete.bench.llamaserver",  # the typing replay through llama-server's /infill and ours
}


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks: JSON out, optional plot")
    sub = bench.add_subparsers(dest="bench", required=True)
    for name, module_name in BENCHMARKS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else None)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
