"""Team server under load: simulated users type at a human pace over HTTP; latency, warm
share and throughput per (replicas, affinity, users), side by side.

    codecomplete bench serve --users 1,4,8 --replicas 1,2 --affinity on,off --json --plot serve.png

With --device cuda (or cpu) the benchmark runs in process instead: one Engine, its batch
scheduler on or off (bench/serve_gpu.py, its own options there).

Each user types through its own place in the file (its own path and session) with
keystroke intervals drawn around --interval-ms and a pause now and then; a keystroke's
request goes to the native endpoint (what the language server's remote mode sends). A user
whose answer comes late sends the next keystroke when it arrives (no superseding). Without
--url the benchmark starts a local Ray Serve application per (replicas, affinity) and, with
--paired-keystrokes, replays one user's keystrokes through one replica and in-process in
turn: the service's cost per warm keystroke, paired by keystroke.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from codecomplete.bench import serve_gpu
from codecomplete.bench.common import (
    TYPING_SAMPLE,
    bench_prompt_path,
    emit,
    format_table,
    percentile,
    progress,
)
from codecomplete.bench.latency import _language
from codecomplete.bench.typists import Typing, type_together, user_keystrokes
from codecomplete.request import CompletionOptions, CompletionRequest

APP_NAME = "codecomplete-bench"
REQUEST_TIMEOUT_S = 60.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", default=str(TYPING_SAMPLE), help="source file the users type through")
    p.add_argument("--language", default="", help="LSP languageId (default: from the extension)")
    p.add_argument("--users", default="1,4,8", help="simulated users, comma-separated to compare")
    p.add_argument("--replicas", default="1,2", help="engine replicas, comma-separated (ignored with --url)")
    p.add_argument("--affinity", default="on", help="on, off or on,off (ignored with --url)")
    p.add_argument("--url", default=None, help="a running server (default: start one on a local Ray)")
    p.add_argument("--api-key", default=None, help="Bearer key for --url")
    p.add_argument("--keystrokes", type=int, default=40, help="keystrokes per user")
    p.add_argument("--interval-ms", type=float, default=150.0, help="median keystroke interval")
    p.add_argument("--pause-ms", type=float, default=800.0, help="median length of a pause")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--deadline-ms", type=float, default=2000.0)
    p.add_argument("--paired-keystrokes", type=int, default=40,
                   help="keystrokes replayed in-process and through one replica in turn (0: skip; not with --url)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None, help="write a p50-latency-by-users PNG")
    serve_gpu.add_arguments(p)


class Client:
    """One keep-alive HTTP connection to the server's native endpoint."""

    def __init__(self, base_url: str, api_key: str | None):
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT_S)

    def complete(self, request: CompletionRequest, session: str) -> tuple[int, dict]:
        """(status, answer); the answer gains `server_timing_ms` (the Server-Timing entries)."""
        from codecomplete.wire import request_to_json

        body = json.dumps(request_to_json(request)).encode()
        try:
            self.conn.request("POST", f"{self.prefix}/v1/engine/complete", body=body,
                              headers={**self.headers, "X-Session-Id": session})
            response = self.conn.getresponse()
            answer = json.loads(response.read() or b"{}")
            answer["server_timing_ms"] = server_timing_ms(response.getheader("Server-Timing", ""))
            return response.status, answer
        except (OSError, http.client.HTTPException, ValueError) as e:
            self.conn.close()  # a new connection for the next request
            return 0, {"error": {"message": type(e).__name__}}

    def health_ms(self) -> float:
        """One GET /health (proxy -> a replica, no engine work): a trivial round trip."""
        t0 = time.perf_counter()
        try:
            self.conn.request("GET", f"{self.prefix}/health", headers=self.headers)
            self.conn.getresponse().read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            return float("nan")
        return (time.perf_counter() - t0) * 1000.0

    def close(self) -> None:
        self.conn.close()


def server_timing_ms(header: str) -> dict[str, float]:
    """`engine;dur=1.2, gateway;dur=3.4` -> {"engine": 1.2, "gateway": 3.4}; malformed entries are skipped."""
    out: dict[str, float] = {}
    for entry in header.split(","):
        name, *params = [part.strip() for part in entry.split(";")]
        for param in params:
            key, _, value = param.partition("=")
            if name and key == "dur":
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
    return out


def _sender(client: Client, session: str):
    """A typist's send: one request to the server, the record's fields from its answer."""
    def send(request: CompletionRequest) -> dict:
        status, answer = client.complete(request, session)
        return {"status": status, "source": answer.get("source"), "replica": answer.get("replica"),
                "new_tokens": answer.get("prefill_new_tokens", 0),
                "engine_ms": answer.get("timings_ms", {}).get("total")}
    return send


def run_users(base_url: str, api_key: str | None, users: int, text: str, path: str, language: str, args) -> dict:
    """All users at once; the row's figures."""
    clients = [Client(base_url, api_key) for _ in range(users)]
    options = CompletionOptions(n=args.n, max_new_tokens=args.max_tokens, deadline_ms=args.deadline_ms,
                                multiline=False)
    typing = Typing(args.keystrokes, args.interval_ms, args.pause_ms)
    records, wall_s = type_together([_sender(c, f"user{u}") for u, c in enumerate(clients)], text, path, language,
                                    typing, options, args.seed)
    for c in clients:
        c.close()
    answered = [r for r in records if r["status"] == 200]
    warm = [r for r in answered if r["source"] in ("warm", "cache")]
    per_user_replicas = {}
    for r in answered:
        per_user_replicas.setdefault(r["user"], set()).add(r["replica"])
    ms = [r["ms"] for r in answered]
    return {"users": users, "requests": len(records), "answered": len(answered),
            "errors": len(records) - len(answered),
            "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
            "warm_share": len(warm) / max(1, len(answered)),
            # typing-as-suggested hits: the replica that showed the suggestion answers it
            "cache_share": sum(r["source"] == "cache" for r in answered) / max(1, len(answered)),
            "prefill_new_tokens_mean": (sum(r["new_tokens"] or 0 for r in answered) / len(answered)
                                        if answered else None),
            "warm_p50_ms": percentile([r["ms"] for r in warm], 50),
            "requests_per_s": len(answered) / wall_s if wall_s else 0.0,
            "replicas_per_user_mean": (sum(len(s) for s in per_user_replicas.values()) / len(per_user_replicas)
                                       if per_user_replicas else None),
            "replicas_seen": len({r["replica"] for r in answered})}


def paired_overhead(base_url: str, text: str, path: str, language: str, args) -> dict:
    """The same keystrokes through the service (one replica) and in-process, in turn: the
    paired difference of warm keystrokes, and where the service's time goes (from the
    Server-Timing the replica sends: its engine, its whole handler)."""
    from codecomplete.engine import Engine

    engine = Engine.load()
    client = Client(base_url, None)
    start, suffix, offsets = user_keystrokes(text, 0, 1, args.paired_keystrokes)
    options = CompletionOptions(n=args.n, max_new_tokens=args.max_tokens, deadline_ms=args.deadline_ms,
                                multiline=False)

    def request(offset: int) -> CompletionRequest:
        return CompletionRequest(text=text[:offset] + suffix, offset=offset, language=language,
                                 path=f"paired/{path}", options=options)

    client.complete(request(start), "paired")
    engine.complete(request(start))
    pairs: dict[str, list[tuple[float, float, float, float]]] = {"warm": [], "cache": []}
    unpaired, trivial_ms, body_ms = 0, [], []
    for offset in offsets:
        trivial_ms.append(client.health_ms())
        t0 = time.perf_counter()
        status, answer = client.complete(request(offset), "paired")
        served = (time.perf_counter() - t0) * 1000.0
        t0 = time.perf_counter()
        local = engine.complete(request(offset))
        alone = (time.perf_counter() - t0) * 1000.0
        if status == 200 and answer.get("source") == local.source and local.source in pairs:
            timing = answer["server_timing_ms"]
            engine_ms = timing.get("engine", answer["timings_ms"].get("total", 0.0))
            pairs[local.source].append((served, alone, engine_ms, timing.get("gateway", float("nan"))))
            body_ms.append(timing.get("body", float("nan")))
        else:
            unpaired += 1
    client.close()
    out: dict = {"keystrokes": len(offsets), "unpaired": unpaired,
                 "trivial_round_trip_p50_ms": percentile([m for m in trivial_ms if m == m], 50),
                 # part of the replica's own time: its call to the proxy for the request body
                 "body_fetch_p50_ms": percentile([m for m in body_ms if m == m], 50)}
    for source, rows in pairs.items():
        out[source] = {
            "pairs": len(rows),
            "service_p50_ms": percentile([s for s, _, _, _ in rows], 50),
            "engine_p50_ms": percentile([a for _, a, _, _ in rows], 50),
            "service_minus_engine_paired_p50_ms": percentile([s - a for s, a, _, _ in rows], 50),
            "service_minus_engine_paired_p95_ms": percentile([s - a for s, a, _, _ in rows], 95),
            # the client's time minus the replica engine's own total: HTTP, proxy, router, replica
            "outside_engine_p50_ms": percentile([s - e for s, _, e, _ in rows], 50),
            # the hop: the client's time minus the replica's handler (HTTP, proxy, router,
            # Ray Serve's replica machinery, the body fetched from the proxy)
            "proxy_hop_p50_ms": percentile([s - g for s, _, _, g in rows if g == g], 50),
            # the replica's handler minus its engine: auth, JSON, the request and answer
            # shapes, the engine thread's hand-off
            "gateway_own_p50_ms": percentile([g - e for _, _, e, g in rows if g == g], 50)}
    return out


def _values(flag: str, value: str, choices: tuple[str, ...] | None = None) -> list:
    """The comma-separated values of a flag: whole numbers of at least 1, or some of `choices`."""
    values = [v.strip() for v in value.split(",") if v.strip()]
    try:
        ok = bool(values) and (all(v in choices for v in values) if choices else all(int(v) >= 1 for v in values))
    except ValueError:
        ok = False
    if not ok:
        wanted = ", ".join(choices) if choices else "whole numbers of at least 1"
        raise SystemExit(f"bench serve: {flag} {value!r}: choose from {wanted} (comma-separated to compare)")
    return values if choices else [int(v) for v in values]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deploy(replicas: int, affinity: bool) -> None:
    from ray import serve

    from codecomplete.serve.app import build_app, wait_until_loaded
    from codecomplete.serve.cli import share_cpus

    threads, replica_cpus = share_cpus("cpu", replicas)
    # a new application, not an update of the last one: a rolling update would wait for CPUs
    # the old replicas hold. And a new name: Ray Serve's proxy keeps the request router it
    # made for an application's deployment when one of the same name is deployed again
    # (affinity on, then off, routed by the affinity router)
    for name in serve.status().applications:
        if name.startswith(APP_NAME):
            serve.delete(name)
    name = f"{APP_NAME}-{replicas}-{'affinity' if affinity else 'p2c'}"
    serve.run(build_app(replicas=replicas, affinity=affinity, threads=threads, replica_cpus=replica_cpus),
              name=name, route_prefix="/")
    wait_until_loaded(name, replicas)


def run(args) -> int:
    users_list = _values("--users", args.users)
    if args.device:
        return serve_gpu.run(args, users_list, _values("--variants", args.variants, serve_gpu.VARIANT_NAMES))
    replicas_list = _values("--replicas", args.replicas)
    affinities = _values("--affinity", args.affinity, ("on", "off"))
    if args.keystrokes < 1:
        raise SystemExit("bench serve: --keystrokes must be at least 1")
    path = str(Path(args.file))
    text = Path(path).read_text(encoding="utf-8")
    language = _language(path, args.language)
    prompt_path = bench_prompt_path(path)
    settings = {"keystrokes": args.keystrokes, "interval_ms": args.interval_ms, "pause_ms": args.pause_ms,
                "n": args.n, "max_tokens": args.max_tokens, "deadline_ms": args.deadline_ms}
    result: dict = {"benchmark": "serve", "file": path, "settings": settings, "rows": []}
    if args.url:
        progress(f"bench serve: {args.url}")
        for users in users_list:
            row = {"replicas": "server's", "affinity": "server's",
                   **run_users(args.url, args.api_key, users, text, prompt_path, language, args)}
            progress(f"  {users} user(s): p50 {row['p50_ms']:.0f} ms, warm {row['warm_share']:.0%}")
            result["rows"].append(row)
    else:
        try:
            import ray
            from ray import serve
        except ModuleNotFoundError:
            raise SystemExit("bench serve needs Ray Serve: pip install 'codecomplete[serve]'") from None
        port = _free_port()
        base_url = f"http://127.0.0.1:{port}"
        progress("bench serve: starting a local Ray instance")
        # Ray's log monitor prints to stdout, which holds the JSON: send it to stderr
        redirect = contextlib.redirect_stdout(sys.stderr)
        redirect.__enter__()
        from codecomplete.serve.common import SERVE_LOGGING, start_ray

        start_ray(log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=SERVE_LOGGING)
            for replicas in replicas_list:
                # one replica routes the same either way
                for affinity in affinities if replicas > 1 else affinities[:1]:
                    progress(f"  deploying {replicas} replica(s), affinity {affinity}")
                    _deploy(replicas, affinity == "on")
                    for users in users_list:
                        row = {"replicas": replicas, "affinity": affinity if replicas > 1 else "-",
                               **run_users(base_url, None, users, text, prompt_path, language, args)}
                        progress(f"    {users} user(s): p50 {row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms, "
                                 f"warm {row['warm_share']:.0%}, typing cache {row['cache_share']:.0%}, "
                                 f"{row['requests_per_s']:.1f} req/s")
                        result["rows"].append(row)
            if args.paired_keystrokes > 0:
                progress(f"  paired: {args.paired_keystrokes} keystrokes through one replica and in-process")
                _deploy(1, True)
                result["paired"] = paired_overhead(base_url, text, prompt_path, language, args)
        finally:
            serve.shutdown()
            ray.shutdown()
            redirect.__exit__(None, None, None)
    columns = ["replicas", "affinity", "users", "p50_ms", "p95_ms", "answered", "errors", "warm_share",
               "cache_share", "prefill_new_tokens_mean", "requests_per_s"]
    emit(result, args.json, format_table(result["rows"], columns))
    if args.plot:
        _plot(result["rows"], args.plot)
    return 0


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    configs: dict[str, list[dict]] = {}
    for r in rows:
        configs.setdefault(f"{r['replicas']} replica(s), affinity {r['affinity']}", []).append(r)
    for name, series in configs.items():
        ax.plot([r["users"] for r in series], [r["p50_ms"] for r in series], marker="o", label=name)
    ax.set_xlabel("users typing")
    ax.set_ylabel("p50 latency (ms)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
