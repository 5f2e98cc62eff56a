"""The `codecomplete` command: complete, models, bench, eval, serve."""

from __future__ import annotations

import argparse
import sys


def _register_all(sub) -> None:
    from codecomplete.commands import register as register_commands

    register_commands(sub)
    from codecomplete.models_command import register as register_models

    register_models(sub)
    from codecomplete.bench.cli import register as register_bench

    register_bench(sub)
    # the serve command registers without Ray installed; running it says how to install it
    from codecomplete.serve.cli import register as register_serve

    register_serve(sub)
    try:
        from codecomplete.eval.cli import register as register_eval
    except ModuleNotFoundError as e:
        if e.name != "codecomplete.eval.cli":
            raise
    else:
        register_eval(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codecomplete", description="Local, offline code completion.")
    sub = parser.add_subparsers(dest="command", required=True)
    _register_all(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
