"""`codecomplete serve`: the team server on Ray Serve (a local Ray instance, or a cluster)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

APP_NAME = "codecomplete"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
INSTALL_HINT = "codecomplete serve needs Ray Serve: pip install 'codecomplete[serve]'"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model folder (default: the shipped model), or random-7b (7B-shaped random weights made on "
                        "each replica: --runtime torch, for scaling runs and bench serve --device --url)")
    p.add_argument("--runtime", default="onnx", choices=["onnx", "torch"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: one GPU per replica (Ray places them)")
    p.add_argument("--precision", default="auto")
    count = p.add_mutually_exclusive_group()
    count.add_argument("--replicas", type=int, default=1, help="engine replicas (default 1)")
    count.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                       help="let Ray Serve keep between MIN and MAX replicas by load (ongoing requests)")
    p.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="with --autoscale: requests per replica (queued and running) Ray Serve scales to keep "
                        "(default 2 without batching, 16 with)")
    p.add_argument("--upscale-delay-s", type=float, default=None,
                   help="with --autoscale: how long the load must stay above target before a replica is added "
                        "(default 15)")
    p.add_argument("--downscale-delay-s", type=float, default=None,
                   help="with --autoscale: how long it must stay below before one is removed, its sessions "
                        "then running cold once elsewhere (default 300)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (not loopback: --api-keys needed)")
    p.add_argument("--port", type=int, default=8012)
    p.add_argument("--api-keys", default=None, metavar="FILE",
                   help="keys file: one key per line, or name:key per line")
    p.add_argument("--per-key-concurrency", type=int, default=4,
                   help="requests in flight per API key before 429 (with --api-keys)")
    p.add_argument("--request-timeout-s", type=float, default=30.0,
                   help="a request no replica answered by then gets 503")
    p.add_argument("--batching", default=None, choices=["on", "off"],
                   help="run a replica's requests together, their decode steps batched (default: on with "
                        "--device cuda, off on CPU)")
    p.add_argument("--rerank-workers", type=int, default=None, metavar="N",
                   help="processes per replica for the reranker's tree-sitter checks, off the GIL its batch "
                        "scheduler needs (default: with batching a quarter of the cores, at most 4; without, 0)")
    p.add_argument("--engine-process", default=None, choices=["on", "off"],
                   help="run each replica's engine in a child process, its batch scheduler off the GIL the "
                        "replica's HTTP handling and Ray's threads hold (default: on with batching, off without)")
    p.add_argument("--affinity", default="on", choices=["on", "off"],
                   help="route each session to the replica holding its KV cache (off: power of two choices)")
    p.add_argument("--exact-new-tokens", type=int, default=0, metavar="N",
                   help="benchmarks only (bench serve --device --url): every keystroke decodes exactly N tokens, "
                        "no stop rule, deadline or typing cache (0: off, the normal service)")
    p.add_argument("--address", default=None,
                   help="join a running Ray cluster (auto, or HOST:PORT of its head); default: start a local one")


def parse_autoscale(value: str) -> tuple[int, int]:
    low, sep, high = value.partition(":")
    try:
        lo, hi = int(low), int(high)
    except ValueError:
        lo = hi = -1
    if not sep or lo < 1 or hi < lo:
        raise SystemExit(f"codecomplete serve: --autoscale {value!r}: expected MIN:MAX with 1 <= MIN <= MAX")
    return lo, hi


def check_settings(args) -> tuple[list, tuple[int, int] | None]:
    """The keys and autoscale range; SystemExit with the reason for settings that must not run."""
    from codecomplete.serve.auth import KeysFileError, load_keys

    autoscale = parse_autoscale(args.autoscale) if args.autoscale else None
    if not autoscale and args.replicas < 1:
        raise SystemExit("codecomplete serve: --replicas must be at least 1")
    if args.exact_new_tokens < 0:
        raise SystemExit("codecomplete serve: --exact-new-tokens must be 0 (off) or more")
    if args.rerank_workers is not None and args.rerank_workers < 0:
        raise SystemExit("codecomplete serve: --rerank-workers must be 0 (rerank in place) or more")
    scaling_flags = {"--target-ongoing-requests": args.target_ongoing_requests,
                     "--upscale-delay-s": args.upscale_delay_s, "--downscale-delay-s": args.downscale_delay_s}
    for flag, value in scaling_flags.items():
        if value is not None and not autoscale:
            raise SystemExit(f"codecomplete serve: {flag} needs --autoscale MIN:MAX")
        if value is not None and (value < 0 or (value == 0 and flag == "--target-ongoing-requests")):
            raise SystemExit(f"codecomplete serve: {flag} {value:g}: must be "
                             f"{'positive' if flag == '--target-ongoing-requests' else 'at least 0'}")
    if args.per_key_concurrency < 1:
        raise SystemExit("codecomplete serve: --per-key-concurrency must be at least 1")
    if args.host not in LOOPBACK_HOSTS and not args.api_keys:
        raise SystemExit(f"codecomplete serve: refusing to listen on {args.host} without --api-keys "
                         "(anyone who reaches it could use the engine)")
    keys = []
    if args.api_keys:
        try:
            keys = load_keys(args.api_keys)
        except KeysFileError as e:
            raise SystemExit(f"codecomplete serve: {e}") from None
    return keys, autoscale


def _log(msg: str) -> None:
    print(f"codecomplete serve: {msg}", file=sys.stderr, flush=True)


def _report_progress(done: threading.Event) -> None:
    """One line per change of the replicas' states while the application deploys."""
    from ray import serve

    last = ""
    while not done.wait(1.0):
        try:
            app = serve.status().applications.get(APP_NAME)
        except Exception:  # the controller is still starting
            continue
        if app is None:
            continue
        parts = []
        for name, dep in app.deployments.items():
            states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(dep.replica_states.items()))
            parts.append(f"{name}: {states or 'no replicas yet'}")
        line = "; ".join(parts)
        if line and line != last:
            _log(f"loading: {line}")
            last = line


def share_cpus(device: str, most_replicas: int) -> tuple[int | None, float]:
    """(onnx threads per replica, Ray CPUs per replica): CPU replicas share the physical cores
    out; one replica keeps the runtime's own policy (all cores while the machine is idle)."""
    from codecomplete.runtime.onnx import physical_cores

    cores = physical_cores()
    threads = max(1, cores // most_replicas) if most_replicas > 1 and device == "cpu" else None
    return threads, max(0.1, round(cores / most_replicas, 2))


def replica_batching(args) -> str:
    """--batching, or its default: on for GPU replicas (many typists share one), off on CPU."""
    return args.batching or ("on" if args.device == "cuda" else "off")


def build_from_settings(args):
    """The application for checked settings (argparse names), and the keys it holds."""
    from codecomplete.serve.app import (
        Autoscaling,
        ServeSettings,
        build_app,
        default_target_ongoing_requests,
    )

    keys, autoscale = check_settings(args)
    threads, replica_cpus = share_cpus(args.device, autoscale[1] if autoscale else args.replicas)
    model_name = Path(args.model).name if args.model else "codecomplete-default"
    settings = ServeSettings(model_name=model_name, keys=tuple(keys), per_key_concurrency=args.per_key_concurrency,
                             request_timeout_s=args.request_timeout_s)
    scaling = None
    if autoscale:
        delays = {name: value for name, value in (("upscale_delay_s", args.upscale_delay_s),
                                                  ("downscale_delay_s", args.downscale_delay_s)) if value is not None}
        target = args.target_ongoing_requests or default_target_ongoing_requests(replica_batching(args))
        scaling = Autoscaling(*autoscale, target_ongoing_requests=target, **delays)
    app = build_app(args.model, runtime=args.runtime, device=args.device, precision=args.precision,
                    replicas=args.replicas, autoscale=scaling, threads=threads, replica_cpus=replica_cpus,
                    affinity=args.affinity == "on", settings=settings, batching=replica_batching(args),
                    exact_new_tokens=args.exact_new_tokens or None, rerank_workers=args.rerank_workers,
                    engine_process=args.engine_process)
    return app, keys, autoscale


def app_builder(builder_args: dict[str, str]):
    """For Ray's own `serve run codecomplete.serve.cli:app_builder api_keys=keys.txt replicas=2`
    and KubeRay's serveConfigV2 (import_path, args): the same settings as `codecomplete serve`
    without --host/--port/--address (the cluster's Serve config has those). An API keys file
    is required: where the cluster's proxy listens is not ours to check."""
    if not builder_args.get("api_keys"):
        raise ValueError("codecomplete serve: api_keys=FILE is required when Ray deploys the application")
    parser = argparse.ArgumentParser(prog="codecomplete serve")
    add_arguments(parser)
    argv = []
    for name, value in builder_args.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    app, _, _ = build_from_settings(parser.parse_args(argv))
    return app


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args) -> int:
    check_settings(args)  # refusals before Ray is imported
    try:
        import ray
        from ray import serve

        from codecomplete.serve.app import wait_until_loaded
        from codecomplete.serve.common import SERVE_LOGGING, start_ray

        app, keys, autoscale = build_from_settings(args)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("ray", "fastapi", "pydantic", "starlette"):
            raise SystemExit(INSTALL_HINT) from None
        raise

    # Ctrl-C, and a service manager's SIGTERM, shut down the same way (a shell may start a
    # background job with SIGINT ignored)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    _log(f"starting Ray ({'joining ' + args.address if args.address else 'a local instance'})")
    try:
        start_ray(args.address)
    except ConnectionError as e:  # a wrong address, a head that is down, or a refused token
        raise SystemExit(f"codecomplete serve: cannot join the Ray cluster at {args.address}: {e}\n"
                         "  (a cluster started with token authentication needs its token here: "
                         "~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)") from None
    serve.start(http_options={"host": args.host, "port": args.port}, logging_config=SERVE_LOGGING)
    done = threading.Event()
    progress = threading.Thread(target=_report_progress, args=(done,), daemon=True)
    progress.start()
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
        _log("replicas running; their engines load (/health answers 503 meanwhile)")
        wait_until_loaded(APP_NAME, autoscale[0] if autoscale else args.replicas)
        done.set()
        replicas = f"{autoscale[0]}-{autoscale[1]} replicas" if autoscale else f"{args.replicas} replica(s)"
        auth = f"{len(keys)} API key(s): {', '.join(k.name for k in keys)}" if keys else "no API keys"
        _log(f"ready at http://{args.host}:{args.port} ({replicas}, {args.runtime}/{args.device}, "
             f"batching {replica_batching(args)}, {auth}"
             f"{f', exactly {args.exact_new_tokens} new tokens a keystroke (benchmark)' if args.exact_new_tokens else ''}); "
             "Ctrl-C stops")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        _log("shutting down")
    finally:
        done.set()
        if args.address:  # a shared cluster: take only our application away
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="team server: many editors share one engine service (Ray Serve)")
    add_arguments(p)
    p.set_defaults(func=run)


__all__ = ["register", "run", "check_settings", "parse_autoscale", "share_cpus", "app_builder", "build_from_settings"]
