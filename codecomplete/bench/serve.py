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

Scaling across replicas (issue 24): each row has keystrokes/s and, next to the one-replica
row of the same users, a scaling efficiency (keystrokes/s at R replicas / (R x at one)).
With --url the bench cannot start replicas itself: --serve-command starts the server once
per --replicas value (`{replicas}` in it is replaced, `{port}` by --url's port), waits for
its "ready" line, runs the rows and stops it (SIGINT); without it --url is one server, and
--replicas, if given, names its replica count (one value):

    codecomplete bench serve --url http://127.0.0.1:8012 --users 8,32,128,256 --replicas 1,2,4 \
        --serve-command "codecomplete serve --device cuda --runtime torch --replicas {replicas} --port {port}" \
        --json --plot scaling.png

--autoscale-ramp runs typists against an autoscaling server instead: they join one by one
up to the largest --users over --ramp-up-s, type for --hold-s, leave over --ramp-down-s,
and the bench reads the replica count (GET /v1/replicas) each second until --tail-s after
the last left (or the count is back where it began): replicas over time, and every request
answered, refused (429/503) or lost (no answer within --lost-after-s).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
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
from codecomplete.bench.typists import (
    Typing,
    keystrokes_per_s,
    type_through,
    type_together,
    user_keystrokes,
)
from codecomplete.request import CompletionOptions, CompletionRequest

APP_NAME = "codecomplete-bench"
REQUEST_TIMEOUT_S = 60.0
REFUSED = (429, 503)  # the server said no (a key's limit, no replica in time): not lost
SERVER_READY_LINE = "ready at"  # what `codecomplete serve` prints once every replica has loaded
SERVER_START_TIMEOUT_S = 900.0
# a keystroke answered from the KV its replica kept: it prefilled at most this share of its
# prompt (or a few tokens); "warm" alone counts any reused token (a shared first token too)
KEPT_KV_NEW_SHARE = 0.1
KEPT_KV_NEW_TOKENS = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", default=str(TYPING_SAMPLE), help="source file the users type through")
    p.add_argument("--language", default="", help="LSP languageId (default: from the extension)")
    p.add_argument("--users", default="1,4,8", help="simulated users, comma-separated to compare")
    p.add_argument("--replicas", default=None,
                   help="engine replicas, comma-separated (default 1,2); with --url: one per --serve-command run, "
                        "or the one server's count")
    p.add_argument("--affinity", default="on", help="on, off or on,off (ignored with --url)")
    p.add_argument("--url", default=None, help="a running server (default: start one on a local Ray)")
    p.add_argument("--api-key", default=None, help="Bearer key for --url")
    p.add_argument("--serve-command", default=None,
                   help="with --url: the command that starts the server, once per --replicas value ({replicas} "
                        "and {port} are filled in); the bench waits for its ready line and stops it after")
    p.add_argument("--autoscale-ramp", action="store_true",
                   help="with --url: ramp typists up to the largest --users and down against an autoscaling "
                        "server; replicas over time, answered / refused / lost")
    p.add_argument("--ramp-up-s", type=float, default=60.0, help="--autoscale-ramp: typists join over this long")
    p.add_argument("--hold-s", type=float, default=60.0, help="--autoscale-ramp: all type for this long")
    p.add_argument("--ramp-down-s", type=float, default=60.0, help="--autoscale-ramp: typists leave over this long")
    p.add_argument("--tail-s", type=float, default=120.0,
                   help="--autoscale-ramp: watch the replica count this long after the last typist left")
    p.add_argument("--lost-after-s", type=float, default=REQUEST_TIMEOUT_S,
                   help="a request without an answer by then counts as lost (the client gives up)")
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

    def __init__(self, base_url: str, api_key: str | None, timeout_s: float = REQUEST_TIMEOUT_S):
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)

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

    def replicas(self) -> dict | None:
        """The server's GET /v1/replicas ({"running": N, "states": {...}}); None when it did not answer."""
        try:
            self.conn.request("GET", f"{self.prefix}/v1/replicas", headers=self.headers)
            response = self.conn.getresponse()
            answer = json.loads(response.read() or b"{}")
        except (OSError, http.client.HTTPException, ValueError):
            self.conn.close()
            return None
        return answer if response.status == 200 and isinstance(answer.get("running"), int) else None

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
                "reused_tokens": answer.get("prefill_reused_tokens", 0),
                "engine_ms": answer.get("timings_ms", {}).get("total")}
    return send


def kept_kv(record: dict) -> bool:
    """Answered from the KV the replica kept for this session (or its typing cache)."""
    if record.get("source") == "cache":
        return True
    new, reused = record.get("new_tokens") or 0, record.get("reused_tokens") or 0
    return reused > 0 and new <= max(KEPT_KV_NEW_TOKENS, KEPT_KV_NEW_SHARE * (new + reused))


def run_users(base_url: str, api_key: str | None, users: int, text: str, path: str, language: str, args) -> dict:
    """All users at once; the row's figures."""
    clients = [Client(base_url, api_key, args.lost_after_s) for _ in range(users)]
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
            "refused": sum(r["status"] in REFUSED for r in records), "lost": sum(r["status"] == 0 for r in records),
            "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
            "keystrokes_per_s": keystrokes_per_s(answered),
            "warm_share": len(warm) / max(1, len(answered)),
            "kept_kv_share": sum(kept_kv(r) for r in answered) / max(1, len(answered)),
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


def add_scaling_efficiency(rows: list[dict]) -> None:
    """Each row's keystrokes/s over R x the one-replica row's at the same users (None
    without such a row), in place."""
    single = {r["users"]: r["keystrokes_per_s"] for r in rows if r["replicas"] == 1}
    for r in rows:
        base = single.get(r["users"])
        r["scaling_efficiency"] = (r["keystrokes_per_s"] / (r["replicas"] * base)
                                   if isinstance(r["replicas"], int) and base else None)


def scaling_summary(rows: list[dict]) -> dict | None:
    """The figures issue 24 asks for, from the rows of one affinity: the load where one
    replica's p95 doubles (the fewest users whose p95 is at least twice the lightest row's),
    and per replica count R at that load: keystrokes/s against one replica's, at the same
    users and at R x the users; p95 at R x the users against one replica's; the kept-KV and
    warm shares against one replica's. None without one-replica rows."""
    single = sorted((r for r in rows if r["replicas"] == 1), key=lambda r: r["users"])
    if not single:
        return None
    lightest_p95 = single[0]["p95_ms"]
    doubled = next((r for r in single if r["p95_ms"] >= 2 * lightest_p95), None)
    out: dict = {"lightest_users": single[0]["users"], "lightest_p95_ms": lightest_p95,
                 "p95_doubles_at_users": doubled["users"] if doubled else None, "replicas": []}
    at = doubled or single[-1]  # the heaviest measured load if p95 never doubled
    by_key = {(r["replicas"], r["users"]): r for r in rows}

    def ratio(a, b):
        return a / b if a is not None and b else None
    for replicas in sorted({r["replicas"] for r in rows if isinstance(r["replicas"], int) and r["replicas"] > 1}):
        same, scaled = by_key.get((replicas, at["users"])), by_key.get((replicas, replicas * at["users"]))
        out["replicas"].append({
            "replicas": replicas, "at_users": at["users"],
            "keystrokes_per_s_ratio_same_users": ratio(same and same["keystrokes_per_s"], at["keystrokes_per_s"]),
            "keystrokes_per_s_ratio_scaled_users": ratio(scaled and scaled["keystrokes_per_s"], at["keystrokes_per_s"]),
            "p95_ratio_scaled_users": ratio(scaled and scaled["p95_ms"], at["p95_ms"]),
            "kept_kv_share_ratio": ratio(same and same["kept_kv_share"], at["kept_kv_share"]),
            "warm_share_ratio": ratio(same and same["warm_share"], at["warm_share"])})
    return out


class ServerProcess:
    """`--serve-command` for one replica count: started, waited for until it prints its ready
    line, stopped with SIGINT (its clean shutdown) on leaving."""

    def __init__(self, template: str, replicas: int, port: int):
        self.command = template.format(replicas=replicas, port=port)
        self.lines: list[str] = []

    def __enter__(self) -> ServerProcess:
        progress(f"  starting: {self.command}")
        self.process = subprocess.Popen(shlex.split(self.command), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True, start_new_session=True)
        ready = threading.Event()

        def read() -> None:
            for line in self.process.stderr:
                self.lines.append(line.rstrip())
                if SERVER_READY_LINE in line:
                    ready.set()
        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not ready.wait(1.0):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                tail = "\n    ".join(self.lines[-8:])
                raise SystemExit(f"bench serve: the server did not become ready: {self.command}\n    {tail}")
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def autoscale_ramp(base_url: str, api_key: str | None, peak_users: int, text: str, path: str, language: str,
                   args) -> dict:
    """Typists join one by one, type, leave one by one (the last to join leaves first); the
    replica count each second; every request's fate."""
    options = CompletionOptions(n=args.n, max_new_tokens=args.max_tokens, deadline_ms=args.deadline_ms,
                                multiline=False)
    up_s, hold_s, down_s = args.ramp_up_s, args.hold_s, args.ramp_down_s
    requests: list[dict] = []  # every request, the files' openings too: (t_s, status)
    lock = threading.Lock()
    t_start = time.perf_counter()

    def typist(user: int) -> None:
        join_s = user * up_s / peak_users
        leave_s = up_s + hold_s + (peak_users - 1 - user) * down_s / peak_users
        time.sleep(max(0.0, join_s - (time.perf_counter() - t_start)))
        client = Client(base_url, api_key, args.lost_after_s)
        send = _sender(client, f"ramp{user}")

        def counted(request: CompletionRequest) -> dict:
            t0 = time.perf_counter()
            fields = send(request)
            with lock:
                requests.append({"t_s": t0 - t_start, "ms": (time.perf_counter() - t0) * 1000.0, **fields})
            return fields
        rng = random.Random(args.seed * 1000 + user)
        while (left := leave_s - (time.perf_counter() - t_start)) > 0:  # type the user's lines over and over
            type_through(counted, text, path, language, user, peak_users,
                         Typing(args.keystrokes, args.interval_ms, args.pause_ms, max_s=left), options, rng, [])
        client.close()

    typists = [threading.Thread(target=typist, args=(u,), daemon=True) for u in range(peak_users)]
    for t in typists:
        t.start()
    watcher = Client(base_url, api_key, 10.0)
    timeline: list[dict] = []
    typing_ends_s = up_s + hold_s + down_s
    while True:
        now_s = time.perf_counter() - t_start
        answer = watcher.replicas()
        active = sum(1 for u in range(peak_users)
                     if u * up_s / peak_users <= now_s < up_s + hold_s + (peak_users - 1 - u) * down_s / peak_users)
        timeline.append({"t_s": round(now_s, 1), "typists": active,
                         "replicas_running": answer["running"] if answer else None,
                         "replica_states": answer["states"] if answer else None})
        typing = any(t.is_alive() for t in typists)
        if not typing and (now_s > typing_ends_s + args.tail_s or (
                answer and timeline[0]["replicas_running"] is not None
                and answer["running"] <= timeline[0]["replicas_running"]
                and max(p["replicas_running"] or 0 for p in timeline) > timeline[0]["replicas_running"])):
            break
        time.sleep(max(0.0, 1.0 - (time.perf_counter() - t_start - now_s)))
    watcher.close()
    statuses = [r["status"] for r in requests]
    counts = [p["replicas_running"] for p in timeline if p["replicas_running"] is not None]
    first = counts[0] if counts else None
    grew_s = next((p["t_s"] for p in timeline if first is not None and (p["replicas_running"] or 0) > first), None)
    peak = max(counts) if counts else None
    peak_s = next((p["t_s"] for p in timeline if p["replicas_running"] == peak), None)
    back_s = next((p["t_s"] for p in timeline if peak_s is not None and p["t_s"] > peak_s and
                   p["replicas_running"] == first), None)
    answered = [r for r in requests if r["status"] == 200]
    return {"peak_users": peak_users, "ramp_up_s": up_s, "hold_s": hold_s, "ramp_down_s": down_s,
            "requests": len(requests), "answered": len(answered),
            "refused": sum(s in REFUSED for s in statuses), "lost": statuses.count(0),
            "other_errors": sum(s not in (0, 200, *REFUSED) for s in statuses),
            "p50_ms": percentile([r["ms"] for r in answered], 50), "p95_ms": percentile([r["ms"] for r in answered], 95),
            "kept_kv_share": sum(kept_kv(r) for r in answered) / max(1, len(answered)),
            "replicas_first": first, "replicas_peak": peak, "replicas_last": counts[-1] if counts else None,
            "first_growth_s": grew_s, "peak_at_s": peak_s, "back_to_first_s": back_s,
            "replicas_seen_answering": len({r["replica"] for r in answered}), "timeline": timeline}


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


def _url_port(url: str) -> int:
    return urlsplit(url).port or 80


def run_url(args, users_list: list[int], text: str, path: str, language: str, result: dict) -> None:
    """The rows against --url: one server, or one per --replicas value with --serve-command."""
    replicas_list = _values("--replicas", args.replicas) if args.replicas else None
    if args.serve_command and not replicas_list and not args.autoscale_ramp:
        raise SystemExit("bench serve: --serve-command needs --replicas (the counts to start it with)")
    if not args.serve_command and replicas_list and len(replicas_list) > 1:
        raise SystemExit("bench serve: --url is one server with one replica count; for rows at "
                         f"{args.replicas} replicas give --serve-command (the bench starts the server once per "
                         "count), or run the bench once per count, restarting the server with --replicas R")
    if args.autoscale_ramp:
        context = (ServerProcess(args.serve_command, replicas_list[0] if replicas_list else 1, _url_port(args.url))
                   if args.serve_command else contextlib.nullcontext())
        with context:
            progress(f"bench serve: autoscale ramp to {max(users_list)} typists against {args.url}")
            result["ramp"] = autoscale_ramp(args.url, args.api_key, max(users_list), text, path, language, args)
        return
    for replicas in replicas_list or [None]:
        context = (ServerProcess(args.serve_command, replicas, _url_port(args.url))
                   if args.serve_command else contextlib.nullcontext())
        with context:
            probe = Client(args.url, args.api_key, 10.0)
            reported = probe.replicas()
            probe.close()
            progress(f"bench serve: {args.url} ({reported['running'] if reported else '?'} replica(s) running)")
            for users in users_list:
                row = {"replicas": replicas if replicas is not None else "server's", "affinity": "server's",
                       "replicas_running": reported["running"] if reported else None,
                       **run_users(args.url, args.api_key, users, text, path, language, args)}
                progress(f"  {users} user(s): p50 {row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms, "
                         f"{row['keystrokes_per_s']:.1f} keystrokes/s, warm {row['warm_share']:.0%}, "
                         f"kept KV {row['kept_kv_share']:.0%}")
                result["rows"].append(row)


def run_local(args, users_list: list[int], text: str, path: str, language: str, result: dict) -> None:
    """The rows against applications this bench deploys on a local Ray."""
    replicas_list = _values("--replicas", args.replicas or "1,2")
    affinities = _values("--affinity", args.affinity, ("on", "off"))
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
                           **run_users(base_url, None, users, text, path, language, args)}
                    progress(f"    {users} user(s): p50 {row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms, "
                             f"warm {row['warm_share']:.0%}, typing cache {row['cache_share']:.0%}, "
                             f"{row['keystrokes_per_s']:.1f} keystrokes/s")
                    result["rows"].append(row)
        if args.paired_keystrokes > 0:
            progress(f"  paired: {args.paired_keystrokes} keystrokes through one replica and in-process")
            _deploy(1, True)
            result["paired"] = paired_overhead(base_url, text, path, language, args)
    finally:
        serve.shutdown()
        ray.shutdown()
        redirect.__exit__(None, None, None)


def run(args) -> int:
    users_list = _values("--users", args.users)
    if args.device:
        return serve_gpu.run(args, users_list, _values("--variants", args.variants, serve_gpu.VARIANT_NAMES))
    if args.keystrokes < 1:
        raise SystemExit("bench serve: --keystrokes must be at least 1")
    if (args.serve_command or args.autoscale_ramp) and not args.url:
        raise SystemExit("bench serve: --serve-command and --autoscale-ramp need --url (where the server listens)")
    if args.lost_after_s <= 0 or min(args.ramp_up_s, args.hold_s, args.ramp_down_s, args.tail_s) < 0:
        raise SystemExit("bench serve: --lost-after-s must be positive, the ramp's durations at least 0")
    path = str(Path(args.file))
    text = Path(path).read_text(encoding="utf-8")
    language = _language(path, args.language)
    prompt_path = bench_prompt_path(path)
    settings = {"keystrokes": args.keystrokes, "interval_ms": args.interval_ms, "pause_ms": args.pause_ms,
                "n": args.n, "max_tokens": args.max_tokens, "deadline_ms": args.deadline_ms,
                "lost_after_s": args.lost_after_s, "serve_command": args.serve_command}
    result: dict = {"benchmark": "serve", "file": path, "settings": settings, "rows": []}
    if args.url:
        run_url(args, users_list, text, prompt_path, language, result)
    else:
        run_local(args, users_list, text, prompt_path, language, result)
    if "ramp" in result:
        ramp = result["ramp"]
        table = format_table([{k: v for k, v in ramp.items() if k != "timeline"}],
                             ["peak_users", "requests", "answered", "refused", "lost", "other_errors", "p50_ms",
                              "p95_ms", "replicas_first", "replicas_peak", "replicas_last", "first_growth_s",
                              "back_to_first_s"])
        emit(result, args.json, table)
        if args.plot:
            _plot_ramp(ramp, args.plot)
        return 0
    add_scaling_efficiency(result["rows"])
    for affinity in sorted({r["affinity"] for r in result["rows"]}):
        summary = scaling_summary([r for r in result["rows"] if r["affinity"] in (affinity, "-")])
        if summary and summary["replicas"]:
            result.setdefault("scaling", {})[affinity] = summary
    columns = ["replicas", "affinity", "users", "p50_ms", "p95_ms", "answered", "refused", "lost", "warm_share",
               "kept_kv_share", "cache_share", "prefill_new_tokens_mean", "keystrokes_per_s", "scaling_efficiency"]
    emit(result, args.json, format_table(result["rows"], columns))
    if args.plot:
        _plot(result["rows"], args.plot)
    return 0


def _plot(rows: list[dict], path: str) -> None:
    """p50 latency and keystrokes/s by users, one line per (replicas, affinity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (latency, rate) = plt.subplots(1, 2, figsize=(10, 3.5))
    configs: dict[str, list[dict]] = {}
    for r in rows:
        configs.setdefault(f"{r['replicas']} replica(s), affinity {r['affinity']}", []).append(r)
    for name, series in configs.items():
        users = [r["users"] for r in series]
        latency.plot(users, [r["p50_ms"] for r in series], marker="o", label=name)
        rate.plot(users, [r["keystrokes_per_s"] for r in series], marker="o", label=name)
    for ax, label in ((latency, "p50 latency (ms)"), (rate, "keystrokes/s answered")):
        ax.set_xlabel("users typing")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
    latency.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plot_ramp(ramp: dict, path: str) -> None:
    """Typists and replicas running over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 3.5))
    points = [p for p in ramp["timeline"] if p["replicas_running"] is not None]
    ax.plot([p["t_s"] for p in ramp["timeline"]], [p["typists"] for p in ramp["timeline"]], label="typists")
    replicas_axis = ax.twinx()
    replicas_axis.step([p["t_s"] for p in points], [p["replicas_running"] for p in points], where="post",
                       color="tab:red", label="replicas running")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("typists")
    replicas_axis.set_ylabel("replicas running")
    replicas_axis.set_ylim(0, max([p["replicas_running"] for p in points] or [1]) + 0.5)
    replicas_axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"answered {ramp['answered']}, refused {ramp['refused']}, lost {ramp['lost']}", fontsize=9)
    fig.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
