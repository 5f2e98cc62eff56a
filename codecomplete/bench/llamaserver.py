"""Side by side with llama-server, run the way llama.vscode and llama.vim users run it.

The same typing replay as `bench latency` (cold requests at several positions, then one
request per typed character) goes to llama.cpp's `llama-server` through its `/infill`
endpoint and to our engine, request by request in turn, on the same GGUF file with the
same thread count, for 1 and 4 candidates.

llama-server is started as llama.vscode's README tells CPU-only users to
(`-ub 1024 -b 1024 --ctx-size 0 --cache-reuse 256`), with `-m FILE` instead of `-hf`,
`-t/-tb THREADS`, and `-np` = the largest candidate count, because its `n_cmpl` (N
completions of one prompt) needs one slot per completion. Each request is the one llama.vim
sends: `input_prefix` (up to 256 lines above the cursor line), `prompt` (the cursor line up
to the cursor), `input_suffix` (the rest of the line and up to 64 lines below),
`input_extra` (empty: the replay has no other files), `cache_prompt: true`, top_k 40,
top_p 0.99 and the `infill` sampler, `n_predict` = --max-tokens, `t_max_predict_ms` = the
deadline. With `-b 1024` the server keeps 768 prefix and up to 254 suffix tokens, the
budget our engine gets from --prompt-tokens 1024. A cold request is sent with
`cache_prompt: false` (the whole prompt is evaluated); our cold request follows
`engine.forget()`. --lines single (the default) stops both at the line end (`stop: ["\\n"]`
for the server, multiline off for us); --lines multi sends llama.vim's request unchanged.

llama-server is not a dependency: build it with --build (or codecomplete/bench/
build_llama_server.sh), which compiles the llama.cpp sources vendored in the
llama-cpp-python sdist from PyPI.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from codecomplete.bench.common import (
    TYPING_SAMPLE,
    bench_prompt_path,
    emit,
    format_table,
    progress,
    rss_mb,
)
from codecomplete.commands import PRECISIONS

BUILD_SCRIPT = Path(__file__).resolve().parent / "build_llama_server.sh"
LLAMA_VIM_PREFIX_LINES = 256  # llama.vim's n_prefix
LLAMA_VIM_SUFFIX_LINES = 64  # llama.vim's n_suffix
LLAMA_VIM_RESPONSE_FIELDS = ["content", "timings/prompt_n", "timings/prompt_ms", "timings/predicted_n",
                             "timings/predicted_ms", "truncated", "tokens_cached"]
HEALTH_TIMEOUT_S = 600.0
SYSTEM = "llama-server"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", default=str(TYPING_SAMPLE), help="source file to type through")
    p.add_argument("--model", default=None,
                   help="GGUF file or pulled model name, for both (default: the evaluation GGUF, "
                        "python -m codecomplete.models.fetch_eval_model)")
    p.add_argument("--engine-model", default=None, help="a different model for our engine (default: --model)")
    p.add_argument("--server", default=None,
                   help="llama-server binary (default: $CODECOMPLETE_CACHE/llama-server/llama-server, "
                        "else llama-server on PATH)")
    p.add_argument("--build", action="store_true", help="build llama-server first when there is none (takes a while)")
    p.add_argument("--server-args", default="", help="more llama-server arguments, one shell-quoted string")
    p.add_argument("--threads", type=int, default=None, help="threads for both (default: physical cores)")
    p.add_argument("--n", default="1,4", help="candidate counts, comma-separated")
    p.add_argument("--keystrokes", type=int, default=40)
    p.add_argument("--cold", type=int, default=3, help="cold requests per candidate count")
    p.add_argument("--start", type=int, default=None, help="character offset where typing begins")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--deadline-ms", type=float, default=2000.0)
    p.add_argument("--prompt-tokens", type=int, default=1024,
                   help="our prefix + suffix budget; llama-server gets it as -b/-ub (it keeps 3/4 before the cursor)")
    p.add_argument("--precision", default="auto", help="our engine's precisions to compare, comma-separated")
    p.add_argument("--lines", choices=("single", "multi"), default="single",
                   help="single: both stop at the line end; multi: llama.vim's request as sent, our multiline auto")
    p.add_argument("--json", action="store_true")


# -- the llama.vim request ------------------------------------------------------------------

def infill_request(text: str, offset: int, n: int, max_tokens: int, deadline_ms: float, single_line: bool) -> dict:
    """The /infill body llama.vim sends for a cursor at `offset` (plus n_cmpl for N candidates)."""
    line_start = text.rfind("\n", 0, offset) + 1
    line_end = text.find("\n", offset)
    line_end = len(text) if line_end < 0 else line_end
    line_prefix, line_suffix = text[line_start:offset], text[offset:line_end]
    above = text[:line_start].split("\n")[:-1][-LLAMA_VIM_PREFIX_LINES:]
    below = text[line_end + 1:].split("\n")[:LLAMA_VIM_SUFFIX_LINES] if line_end < len(text) else []
    indent = len(line_prefix) - len(line_prefix.lstrip(" \t"))
    if not (line_prefix + line_suffix).strip():  # llama.vim: a blank line starts from its beginning
        line_prefix, line_suffix, indent = "", "", 0
    body = {
        "input_prefix": "\n".join(above) + "\n",
        "input_suffix": line_suffix + "\n" + "\n".join(below) + "\n",
        "input_extra": [],
        "prompt": line_prefix,
        "n_predict": max_tokens,
        "n_indent": indent,
        "top_k": 40,
        "top_p": 0.99,
        "stream": False,
        "samplers": ["top_k", "top_p", "infill"],
        "cache_prompt": True,
        "t_max_prompt_ms": 500,
        "t_max_predict_ms": int(deadline_ms),
        "response_fields": LLAMA_VIM_RESPONSE_FIELDS,
    }
    if n > 1:
        body["n_cmpl"] = n
    if single_line:
        body["stop"] = ["\n"]
    return body


def post_json(url: str, body: dict, timeout_s: float = 600.0):
    request = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


@dataclass
class ServerAnswer:
    """One /infill answer in the shape the typing replay reads from a Completion."""
    source: str  # cold | warm
    prefill_new_tokens: int
    tokens_generated: int
    texts: list[str]
    timings_ms: dict[str, float]
    tokens_cached: int = 0
    prefill_adopted_tokens: int = 0
    model_calls: int = 1
    decode_rows: int = 0
    branch_rows: int = 0


class LlamaServerClient:
    """llama-server's /infill as an engine for `replay_engines`: complete(request), forget()."""

    def __init__(self, url: str, max_tokens: int, deadline_ms: float, single_line: bool):
        self.url = url.rstrip("/")
        self.max_tokens, self.deadline_ms, self.single_line = max_tokens, deadline_ms, single_line
        self._next_is_cold = False
        self.sent: list[dict] = []  # the last request body, for the report

    def forget(self) -> None:
        self._next_is_cold = True

    def complete(self, request) -> ServerAnswer:
        body = infill_request(request.text, request.offset, request.options.n, self.max_tokens,
                              self.deadline_ms, self.single_line)
        cold, self._next_is_cold = self._next_is_cold, False
        if cold:
            body["cache_prompt"] = False
        self.sent = [body]
        t0 = time.perf_counter()
        answer = post_json(f"{self.url}/infill", body)
        total_ms = (time.perf_counter() - t0) * 1000
        results = answer if isinstance(answer, list) else [answer]
        first = results[0]
        cached = int(first.get("tokens_cached", 0) or 0)
        prompt_n = int(first.get("timings/prompt_n", 0) or 0)
        return ServerAnswer(
            source="cold" if cold else "warm", prefill_new_tokens=prompt_n,
            tokens_generated=sum(int(r.get("timings/predicted_n", 0) or 0) for r in results),
            texts=[r.get("content", "") for r in results], tokens_cached=cached,
            timings_ms={"prompt": float(first.get("timings/prompt_ms", 0.0) or 0.0),
                        "predict": max(float(r.get("timings/predicted_ms", 0.0) or 0.0) for r in results),
                        "total": total_ms})

    def describe(self) -> dict:
        return {"runtime": SYSTEM, "url": self.url}


# -- the server process -----------------------------------------------------------------------

def default_server_binary() -> str | None:
    from codecomplete.hub import cache_root

    built = cache_root() / "llama-server" / "llama-server"
    if built.exists():
        return str(built)
    import shutil

    return shutil.which("llama-server")


def build_server() -> str:
    """Run build_llama_server.sh (its progress on stderr); the binary's path."""
    progress(f"bench llamaserver: building llama-server with {BUILD_SCRIPT.name} (this takes a while)")
    done = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PIP": f"{sys.executable} -m pip"})
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise SystemExit(f"bench llamaserver: the build failed (exit {done.returncode})")
    return lines[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(binary: str, gguf: Path, port: int, threads: int, slots: int, batch: int,
                   extra: list[str]) -> list[str]:
    """llama.vscode's CPU-only llama-server line, on our GGUF, threads and slot count."""
    return [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-ngl", "0",
            "-ub", str(batch), "-b", str(batch), "--ctx-size", "0", "--cache-reuse", "256",
            "-t", str(threads), "-tb", str(threads), "-np", str(slots), *extra]


def process_memory_mb(pid: int | str = "self") -> dict[str, float]:
    """Resident memory now and at its peak (VmRSS, VmHWM) of a process, in MiB (Linux)."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found["rss_mb" if key == "VmRSS" else "peak_rss_mb"] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        pass
    return found


@dataclass
class RunningServer:
    command: list[str]
    process: subprocess.Popen
    url: str
    log_path: Path
    load_ms: float = 0.0
    notes: list[str] = field(default_factory=list)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)


def start_server(command: list[str], port: int, log_dir: Path) -> RunningServer:
    """Start llama-server and wait until /health says it has loaded the model."""
    log_path = log_dir / "llama-server.log"
    log = open(log_path, "wb")  # noqa: SIM115 - the server writes to it until stop()
    t0 = time.perf_counter()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    server = RunningServer(command, process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"bench llamaserver: llama-server exited ({process.returncode}):\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=5) as response:
                if response.status == 200:
                    server.load_ms = (time.perf_counter() - t0) * 1000
                    return server
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or 503 while it loads the model
        time.sleep(0.2)
    server.stop()
    raise SystemExit(f"bench llamaserver: llama-server was not healthy after {HEALTH_TIMEOUT_S:.0f} s")


def server_version(binary: str) -> str:
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = [x for x in (done.stdout + done.stderr).splitlines() if x.startswith("version")]
    return lines[0] if lines else ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()


# -- the run ----------------------------------------------------------------------------------

def _summary(stats: dict) -> dict:
    keys = ("warm_p50_ms", "warm_p95_ms", "cold_p50_ms", "cold_p95_ms", "warm_requests", "cold_requests",
            "cache_hit_rate", "warm_prefill_new_tokens_p50", "warm_tokens_generated_mean")
    return {k: stats.get(k) for k in keys}


def ratios_to_server(runs: dict[str, dict[str, dict]]) -> list[dict]:
    """ours / llama-server for warm and cold p50 (and the per-keystroke paired warm ratio), per N."""
    from codecomplete.bench.latency import policy_ratios

    out = []
    for n, by_system in runs.items():
        server = by_system.get(SYSTEM)
        if server is None:
            continue
        for system, stats in by_system.items():
            if system != SYSTEM:
                r = policy_ratios(server, stats)
                out.append({"system": system, "n": int(n), "warm_p50": _round(r["warm_p50_ratio"]),
                            "cold_p50": _round(r["cold_p50_ratio"]),
                            "warm_paired_p50": _round(r["warm_paired_ratio_p50"])})
    return out


def _round(value):
    return None if value is None else round(value, 3)


def _resolve_gguf(value: str | None) -> Path:
    from codecomplete.bench.llamacpp import default_model
    from codecomplete.hub import HubError, resolve_model_path

    if value is None:
        return default_model()
    try:
        return Path(resolve_model_path(value)).expanduser()
    except HubError as e:
        raise SystemExit(f"bench llamaserver: {e}") from e


def load_engines(model: str, precisions: list[str], threads: int) -> tuple[dict, dict]:
    from codecomplete.engine import Engine
    from codecomplete.runtime import load_runtime

    engines, loaded = {}, {}
    for precision in precisions:
        name = f"codecomplete ({precision})"
        t0 = time.perf_counter()
        engines[name] = Engine(load_runtime(model, precision=precision, threads=threads))
        loaded[name] = {"load_ms": round((time.perf_counter() - t0) * 1000, 1), **process_memory_mb()}
        progress(f"  {name}: loaded in {loaded[name]['load_ms']:.0f} ms, {rss_mb():.0f} MiB resident")
    return engines, loaded


def run(args: argparse.Namespace) -> int:
    from codecomplete.bench.latency import _language, _variant_values, default_start, replay_engines
    from codecomplete.runtime.onnx import physical_cores

    gguf = _resolve_gguf(args.model)
    if not gguf.is_file() or gguf.suffix != ".gguf":
        print(f"bench llamaserver: no GGUF file at {gguf} (python -m codecomplete.models.fetch_eval_model, "
              "or --model FILE.gguf)", file=sys.stderr)
        return 2
    try:
        ns = sorted({int(x) for x in args.n.split(",") if x.strip()})
    except ValueError:
        ns = []
    if not ns or ns[0] < 1:
        print(f"bench llamaserver: --n {args.n!r}: expected candidate counts such as 1,4", file=sys.stderr)
        return 2
    precisions = _variant_values("--precision", args.precision, PRECISIONS)
    binary = args.server or default_server_binary()
    if binary is None and args.build:
        binary = build_server()
    if binary is None:
        print("bench llamaserver: no llama-server (pass --server PATH, or --build to compile one from the "
              "llama-cpp-python sdist)", file=sys.stderr)
        return 2
    threads = args.threads or physical_cores()
    text = Path(args.file).read_text(encoding="utf-8")
    path = bench_prompt_path(args.file)
    language = _language(args.file, "")
    start = args.start if args.start is not None else default_start(text, args.keystrokes)
    single_line = args.lines == "single"
    extra = shlex.split(args.server_args)

    port = free_port()
    command = server_command(binary, gguf, port, threads, max(ns), args.prompt_tokens, extra)
    progress(f"bench llamaserver: {' '.join(shlex.quote(c) for c in command)}")
    with tempfile.TemporaryDirectory(prefix="llamaserver-bench-") as log_dir:
        server = start_server(command, port, Path(log_dir))
        try:
            server_loaded = {"load_ms": round(server.load_ms, 1), **process_memory_mb(server.process.pid)}
            progress(f"  llama-server: healthy after {server.load_ms:.0f} ms")
            client = LlamaServerClient(server.url, args.max_tokens, args.deadline_ms, single_line)
            engines, engines_loaded = load_engines(str(args.engine_model or gguf), precisions, threads)
            systems = {SYSTEM: client, **engines}
            suffix_budget = args.prompt_tokens // 4
            runs, examples = {}, {}
            for n in ns:
                opts = dict(n=n, max_new_tokens=args.max_tokens, deadline_ms=args.deadline_ms,
                            multiline=False if single_line else None,
                            prefix_tokens=args.prompt_tokens - suffix_budget, suffix_tokens=suffix_budget)
                progress(f"  n={n}: {args.cold} cold requests, {args.keystrokes} keystrokes, systems in turn")
                replay = replay_engines(systems, text, path, language, start, args.keystrokes, opts, args.cold)
                runs[str(n)] = replay
                examples[str(n)] = client.sent[0] if client.sent else {}
            server_memory = process_memory_mb(server.process.pid)
        finally:
            server.stop()
    result = {
        "benchmark": "llamaserver", "cpu": cpu_model(), "threads": threads, "model": gguf.name,
        "engine_model": Path(args.engine_model).name if args.engine_model else gguf.name,
        "settings": {"keystrokes": args.keystrokes, "cold": args.cold, "max_new_tokens": args.max_tokens,
                     "deadline_ms": args.deadline_ms, "prompt_tokens": args.prompt_tokens, "lines": args.lines,
                     "start": start, "n": ns},
        "llama_server": {"command": [Path(c).name if c in (binary, str(gguf)) else c for c in command],
                         "version": server_version(binary), **server_loaded,
                         "after_replay": server_memory, "example_request": examples.get(str(ns[-1]), {})},
        "engines": {name: {"model": engines[name].describe(), **info, "after_replay": process_memory_mb()}
                    for name, info in engines_loaded.items()},
        "runs": {n: {system: _summary(stats) for system, stats in replay.items()} for n, replay in runs.items()},
        "ratios": ratios_to_server(runs),
        "notes": ["ours runs in this process, llama-server behind HTTP on 127.0.0.1 (about 1 ms per request); "
                  "peak_rss_mb of ours is this whole benchmark process"],
    }
    rows = []
    by_ratio = {(r["system"], r["n"]): r for r in result["ratios"]}
    for n, by_system in result["runs"].items():
        for system, stats in by_system.items():
            ratio = by_ratio.get((system, int(n)), {})
            memory = (result["llama_server"]["after_replay"] if system == SYSTEM
                      else result["engines"][system]["after_replay"])
            rows.append({"system": system, "n": int(n), "warm p50 ms": stats["warm_p50_ms"],
                         "warm p95 ms": stats["warm_p95_ms"], "cold p50 ms": stats["cold_p50_ms"],
                         "cold p95 ms": stats["cold_p95_ms"], "peak RSS MiB": memory.get("peak_rss_mb", ""),
                         "warm vs server": ratio.get("warm_p50", ""), "cold vs server": ratio.get("cold_p50", "")})
    emit(result, args.json, format_table(rows, list(rows[0].keys())))
    return 0
