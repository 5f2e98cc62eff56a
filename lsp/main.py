"""codecomplete-lsp: the command line of the language server (the handlers are in server.py).

    codecomplete-lsp                      # stdio
    codecomplete-lsp --tcp 127.0.0.1:2087 # or a TCP port (127.0.0.1 unless a host is given)
    codecomplete-lsp --model DIR --runtime torch --device cpu
    codecomplete-lsp --check --model DIR  # load the model, report, exit 0 / 1
    codecomplete-lsp --nvim-runtime       # the folder Neovim's 'runtimepath' needs for require('codecomplete')

Also `python -m codecomplete.lsp`. Logs go to stderr and to the client (window/logMessage),
never to stdout: in stdio mode stdout is the LSP channel.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from pathlib import Path

from codecomplete.runtime import DEVICES, RUNTIMES

from .client_log import ClientLogHandler
from .process import SafeStdin, claim_stdout
from .server import create_server
from .settings import Settings, apply_settings
from .worker import EngineFactory, default_engine_factory

NVIM_RUNTIME = Path(__file__).resolve().parent / "nvim"  # holds lua/codecomplete/init.lua


def parse_tcp(value: str) -> tuple[str, int]:
    """--tcp HOST:PORT or PORT -> (host, port); the host defaults to 127.0.0.1."""
    host, _, port = value.rpartition(":")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT or PORT, got {value!r}") from None


def load_factory(spec: str) -> EngineFactory:
    """--engine-factory MODULE:NAME -> the callable it names."""
    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(prog="codecomplete-lsp", description="codecomplete language server (stdio by default)")
    p.add_argument("--stdio", action="store_true", help="talk LSP over stdin/stdout (the default)")
    p.add_argument("--tcp", type=parse_tcp, metavar="HOST:PORT", help="listen on TCP instead (host 127.0.0.1 if omitted)")
    p.add_argument("--model", default=None, help="model folder, .gguf file or a pulled model's name (default: the shipped model)")
    p.add_argument("--runtime", choices=RUNTIMES, default=d.runtime)
    p.add_argument("--device", choices=DEVICES, default=d.device)
    p.add_argument("--candidates", type=int, default=d.candidates)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--deadline-ms", type=int, default=d.deadline_ms)
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.add_argument("--check", action="store_true", help="load the model, print what loaded, exit 0 (or 1 with the error)")
    p.add_argument("--nvim-runtime", action="store_true",
                   help="print the folder to add to Neovim's 'runtimepath' for require('codecomplete'), then exit")
    p.add_argument("--in-process", action="store_true",
                   help="run the engine in the server's process (default: a child process that is restarted "
                        "when the model runtime crashes; setting isolate)")
    p.add_argument("--server", default="", metavar="URL", help="use the team service at URL (setting server)")
    p.add_argument("--engine-factory", default=None, metavar="MODULE:NAME",
                   help="for tests: a callable (model, runtime, device) -> engine instead of the real engine")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nvim_runtime:
        print(NVIM_RUNTIME)
        return 0
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="codecomplete-lsp %(levelname)s %(name)s: %(message)s")
    logging.getLogger("codecomplete").setLevel(args.log_level)
    factory = load_factory(args.engine_factory) if args.engine_factory else default_engine_factory
    defaults, errors = apply_settings(Settings(), {"runtime": args.runtime, "device": args.device,
                                                   "candidates": args.candidates, "maxTokens": args.max_tokens,
                                                   "deadlineMs": args.deadline_ms,
                                                   "isolate": not args.in_process, "server": args.server})
    for error in errors:
        print(f"codecomplete-lsp: {error}", file=sys.stderr)
    if args.check:
        return check(factory, args.model, defaults)
    channel = claim_stdout() if args.tcp is None else None
    server = create_server(factory, defaults, default_model=args.model)
    logging.getLogger("codecomplete").addHandler(ClientLogHandler(server))
    if args.tcp is not None:
        server.start_tcp(*args.tcp)
    else:
        server.start_io(SafeStdin(sys.stdin.buffer), channel)
    code = 0 if server.protocol.shutdown_received else 1  # the LSP rule: exit without shutdown is an error
    sys.stderr.flush()
    os._exit(code)  # the worker may be mid-decode in native code: do not wait for it


def check(factory: EngineFactory, model: str | None, settings: Settings) -> int:
    """--check: load the engine once; 0 and what loaded, or 1 and why not (on stderr)."""
    t0 = time.perf_counter()
    try:
        engine = factory(model, settings.runtime, settings.device)
    except Exception as e:
        print(f"codecomplete-lsp: could not load {model or 'the default model'}: {e}", file=sys.stderr)
        return 1
    describe = getattr(engine, "describe", None)
    info = describe() if callable(describe) else type(engine).__name__
    print(f"codecomplete-lsp: loaded {model or 'the default model'} in {(time.perf_counter() - t0) * 1000:.0f} ms: {info}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
