"""The host's own cost per request-step: the real engine and batch scheduler over a runtime
whose steps are free.

    codecomplete bench host --vocab 152064,16384 --users 1,8,32 --variants sequential,batched --json

A stand-in runtime (FreeRuntime) answers prefill and decode_many at once with precomputed
float32 logits of the model's shape (a few dozen tokens near the best, the rest far below,
as a trained model's rows look), so what a keystroke costs is the host's Python alone: the
prompt, the thread hand-offs, the scheduler's gather, sampling over the vocabulary,
alignment, stop rules. U users each send --keystrokes keystrokes back to back (no typing
pace), N candidates, exactly --new-tokens tokens each. Per row: keystrokes/s, p50/p95
keystroke, host microseconds per request-step (wall time over the decode steps the requests
made), requests per scheduler step; each row is set against the sequential one and the
first variant's. --profile adds the functions where the time goes (cProfile in every
thread, merged).

Vocabularies: 152064 is Qwen2.5-Coder's (the stand-in byte tokenizer bench serve's random-7b
uses), any other size the shipped model's tokenizer padded with placeholder ids.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from codecomplete.bench.common import TYPING_SAMPLE, emit, format_table, percentile, progress
from codecomplete.bench.typists import Typing, keystrokes_per_s, type_together
from codecomplete.request import CompletionOptions, CompletionRequest
from codecomplete.runtime.base import BranchState, ContextState, DecodeStep, Runtime, TopRows
from codecomplete.sampler import TAIL, TOP_K

QWEN_VOCAB = 152064
# variant -> Engine keywords
VARIANTS = {"sequential": {"batching": "off", "rerank_workers": 0},
            "sequential-top": {"batching": "off", "rerank_workers": 0},
            "batched-threads": {"batching": "on", "drive_loops": False, "rerank_workers": 0},
            "batched": {"batching": "on", "rerank_workers": 0},
            "batched-top": {"batching": "on", "rerank_workers": 0},
            "batched-top-pool": {"batching": "on", "rerank_workers": None}}  # None: --rerank-workers
REDUCING = {"sequential-top", "batched-top", "batched-top-pool"}  # the runtime hands the driven loops TopRows, as the torch runtime does on CUDA
NEAR_TOKENS = 24  # tokens of a row within sampling reach of its best
ROW_SHAPES = ("peaked", "flat")
MAX_ROWS = 256  # rows of precomputed logits a step's views are cut from (32 users x 4 fit)
PROFILE_LINES = 30


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", default=str(TYPING_SAMPLE), help="source file the users type through")
    p.add_argument("--vocab", default=f"{QWEN_VOCAB},16384", help="vocabulary sizes, comma-separated")
    p.add_argument("--users", default="1,8,32", help="concurrent users, comma-separated")
    p.add_argument("--variants", default="sequential,sequential-top,batched-threads,batched,batched-top,batched-top-pool",
                   help=f"comma-separated: {', '.join(VARIANTS)} (sequential-top: one request at a time on rows "
                        "reduced to their best tokens, as the torch runtime does on CUDA; batched-threads: each request's decode loop "
                        "in its own thread, the scheduler batching its calls; batched: the scheduler steps the "
                        "loops; batched-top: and the runtime reduces the rows to their best tokens, as on CUDA; batched-top-pool: and "
                        "the reranker's tree-sitter checks run in --rerank-workers processes, as a GPU replica's do)")
    p.add_argument("--rerank-workers", type=int, default=None,
                   help="batched-top-pool's rerank processes (default: a GPU replica's default on this machine, "
                        "at least 1)")
    p.add_argument("--keystrokes", type=int, default=12, help="keystrokes per user")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--context-tokens", type=int, default=2048)
    p.add_argument("--gather-ms", type=float, default=None, help="the scheduler's gather bound (default its own)")
    p.add_argument("--rounds", type=int, default=3,
                   help="the variants of a row run in turn this many times; each figure is the median")
    p.add_argument("--profile", action="store_true", help="add the top functions by own time to each row")
    p.add_argument("--rows", default="peaked", choices=ROW_SHAPES,
                   help="the stand-in's logits: peaked (a trained model's) or flat (random weights', as bench "
                        "serve's random-7b)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")


class FreeRuntime(Runtime):
    """A runtime whose calls cost nothing: every prefill and decode row gets the same
    precomputed logits (views of one array, as a batching runtime hands out views of its
    step's host buffer)."""

    name = "free"
    reuses_branches = False

    def __init__(self, config, tokenizer, seed: int = 0, rows: str = "peaked"):
        """rows: "peaked" (a few dozen tokens well above the rest, as a trained model's
        rows look) or "flat" (every token drawn alike, as random weights give: bench serve's
        random-7b)."""
        if rows not in ROW_SHAPES:
            raise ValueError(f"rows must be one of {', '.join(ROW_SHAPES)}, not {rows!r}")
        self.config, self.tokenizer = config, tokenizer
        rng = np.random.default_rng(seed)
        vocab = config.vocab_size
        rows_ = rng.normal(0.0, 2.0, (MAX_ROWS, vocab)).astype(np.float32)
        texted = np.array([i for i, b in enumerate(tokenizer.token_bytes[:vocab]) if b and b.isascii()
                           and b.strip() and i not in set(config.eos_ids)], dtype=np.int64)
        for row in rows_ if rows == "peaked" else ():  # a few candidates well above the rest
            near = rng.choice(texted, size=min(NEAR_TOKENS, len(texted)), replace=False)
            row[near] += 30.0 + rng.normal(0.0, 2.0, len(near)).astype(np.float32)
        rows = rows_
        self._logits = rows
        self.reduces_rows = False
        self._top: TopRows | None = None  # the rows reduced, made when first asked for

    def prefill(self, tokens, previous=None, *, capacity_tokens=None):
        tokens = self.check_prefill(tokens)
        keep = self.reuse_split(tokens, previous)
        return ContextState(tokens, reused_tokens=keep, new_tokens=len(tokens) - keep), self._logits[0]

    def start_branches(self, context, n, max_new_tokens):
        return BranchState(n=n, max_new_tokens=max_new_tokens)

    def decode(self, context, branches, next_tokens):
        return self.decode_many([DecodeStep(context, branches, next_tokens)])[0]

    def _rows_of(self, steps: Sequence[DecodeStep]) -> list[slice]:
        out, r0 = [], 0
        for s in steps:
            self.check_decode(s.context, s.branches, s.next_tokens)
            n = s.branches.n
            out.append(slice(r0 % (MAX_ROWS - n), r0 % (MAX_ROWS - n) + n))
            r0 += n
            s.branches.step += 1
        return out

    def decode_many(self, steps: Sequence[DecodeStep]) -> list[np.ndarray]:
        return [self._logits[rows] for rows in self._rows_of(steps)]

    def decode_many_top(self, steps, full, banned, k, tail):
        """The precomputed rows' reduction (their best k tokens; banned ids are not among
        them), as a device would hand it over."""
        top = self.top_rows(k, tail)
        out = []
        for rows, whole in zip(self._rows_of(steps), full, strict=True):
            if whole:
                out.append(self._logits[rows])
            else:
                out.append(top[rows])
                out[-1].banned = banned
        return out

    def top_rows(self, k: int, tail: float) -> TopRows:
        """All precomputed rows reduced (made once)."""
        if self._top is None:
            best = np.sort(np.argpartition(self._logits, -k, axis=1)[:, -k:], axis=1)
            values = np.take_along_axis(self._logits, best, axis=1)
            m = values.max(axis=1, keepdims=True)
            lse = m[:, 0] + np.log(np.where(values >= m - tail, np.exp(values - m), 0.0).sum(axis=1))
            self._top = TopRows(best, values, lse.astype(np.float32), lambda index: self._logits[index],
                                gather=lambda r, ids: self._logits[r, ids], vocab=self._logits.shape[1])
        return self._top

    def select_branches(self, branches, keep):
        return BranchState(n=len(keep), max_new_tokens=branches.max_new_tokens, step=branches.step)


def stand_in(vocab: int, context_tokens: int, new_tokens: int, seed: int, rows: str = "peaked") -> FreeRuntime:
    """Qwen's vocabulary: the byte stand-in tokenizer; another size: the shipped model's
    tokenizer and config, resized."""
    from dataclasses import replace

    if vocab == QWEN_VOCAB:
        from codecomplete.models.testing import qwen7b_shape_config, standin_tokenizer

        cfg = qwen7b_shape_config(max_seq_len=context_tokens + new_tokens + 64, fim_order="spm")
        return FreeRuntime(cfg, standin_tokenizer(cfg), seed, rows)
    from codecomplete.models.format.hf_import import pad_tokenizer_to
    from codecomplete.models.format.source import load_model_source
    from codecomplete.models.format.tokenizer import Tokenizer

    source = load_model_source(None)
    if vocab < len(source.tokenizer.token_bytes):
        raise SystemExit(f"bench host: --vocab {vocab} is smaller than the shipped tokenizer's "
                         f"{len(source.tokenizer.token_bytes)} tokens")
    hf = source.tokenizer._tok
    pad_tokenizer_to(hf, vocab)
    cfg = replace(source.config, vocab_size=vocab, max_seq_len=max(source.config.max_seq_len,
                                                                   context_tokens + new_tokens + 64))
    return FreeRuntime(cfg, Tokenizer(hf, source.tokenizer.special_tokens), seed, rows)


class ThreadProfiles:
    """cProfile in every thread that calls `wrap`-ped functions, merged at the end."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._all: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def wrap(self, fn):
        def profiled(*args, **kwargs):
            prof = getattr(self._local, "prof", None)
            if prof is None:
                prof = self._local.prof = cProfile.Profile()
                with self._lock:
                    self._all.append(prof)
            prof.enable()
            try:
                return fn(*args, **kwargs)
            finally:
                prof.disable()
        return profiled

    def top(self, lines: int = PROFILE_LINES) -> list[str]:
        if not self._all:
            return []
        out = io.StringIO()
        stats = pstats.Stats(self._all[0], stream=out)
        for prof in self._all[1:]:
            stats.add(prof)
        stats.sort_stats("tottime").print_stats(lines)
        text = out.getvalue().splitlines()
        start = next((i for i, line in enumerate(text) if line.strip().startswith("ncalls")), 0)
        return [line.rstrip() for line in text[start:] if line.strip()]


def rerank_workers(args) -> int:
    from codecomplete.rerank_pool import default_rerank_workers

    if args.rerank_workers is not None:
        return max(1, args.rerank_workers)
    return max(1, default_rerank_workers("on"))


def run_row(runtime: FreeRuntime, variant: str, users: int, doc: str, language: str, options: CompletionOptions,
            args) -> dict:
    from codecomplete.engine import Engine

    kwargs = dict(VARIANTS[variant])
    if kwargs["rerank_workers"] is None:
        kwargs["rerank_workers"] = rerank_workers(args)
    if args.gather_ms is not None and kwargs["batching"] == "on":
        kwargs["gather_ms"] = args.gather_ms
    runtime.reduces_rows = variant in REDUCING
    if runtime.reduces_rows:
        runtime.top_rows(TOP_K, TAIL)  # made before the clock starts
    engine = Engine(runtime, cached_documents=2 * users + 2, **kwargs)
    engine.exact_new_tokens = args.new_tokens
    engine.reuse_keystrokes = False  # every keystroke decodes all its steps
    profiles = ThreadProfiles() if args.profile else None
    scheduler = engine.scheduler
    scheduler_cpu_s = [0.0]
    scheduler_busy_s = [0.0]  # the iterations' wall time outside the gather's waits
    if scheduler is not None:
        iteration = profiles.wrap(scheduler._iteration) if profiles is not None else scheduler._iteration
        gather = scheduler._gather

        def timed_iteration():  # the scheduler thread's own CPU time: the driven loops' sampling
            t0, w0 = time.thread_time(), time.perf_counter()
            try:
                return iteration()
            finally:
                scheduler_cpu_s[0] += time.thread_time() - t0
                scheduler_busy_s[0] += time.perf_counter() - w0

        def timed_gather():
            w0 = time.perf_counter()
            try:
                return gather()
            finally:
                scheduler_busy_s[0] -= time.perf_counter() - w0

        scheduler._iteration, scheduler._gather = timed_iteration, timed_gather
    complete = profiles.wrap(engine.complete) if profiles is not None else engine.complete

    def send(request: CompletionRequest) -> dict:
        c = complete(request)
        return {"status": 200, "steps": c.model_calls - int(c.prefill_new_tokens > 0), "rows": c.decode_rows,
                "stages": c.timings_ms}

    try:
        type_together([send], doc, "warmup.py", language, Typing(2, 0.0, 0.0), options, args.seed)
        if scheduler is not None:
            scheduler.stats.reset()
            scheduler_cpu_s[0] = scheduler_busy_s[0] = 0.0
        cpu0 = time.process_time()
        records, wall_s = type_together([send] * users, doc, "file.py", language,
                                        Typing(args.keystrokes, 0.0, 0.0), options, args.seed)
        cpu_s = time.process_time() - cpu0
    finally:
        engine.close()
    steps = sum(r["steps"] for r in records)
    ms = [r["ms"] for r in records]
    span_s = max(r["t1"] for r in records) - min(r["t0"] for r in records)
    row = {"vocab": runtime.config.vocab_size, "variant": variant, "users": users, "rerank_workers": kwargs["rerank_workers"], "keystrokes": len(records),
           "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95), "keystrokes_per_s": keystrokes_per_s(records),
           "request_steps_per_keystroke": steps / max(1, len(records)),
           "host_us_per_request_step": span_s * 1e6 / max(1, steps),
           # CPU time of all threads: less disturbed by other processes on a shared machine
           "host_cpu_us_per_request_step": cpu_s * 1e6 / max(1, steps),
           "host_ms_per_keystroke": span_s * 1e3 / max(1, len(records)), "wall_s": wall_s}
    # each stage's wall time per keystroke (Completion.timings_ms; "generate" holds the decode loop)
    row["stage_ms"] = {k: statistics.fmean(r["stages"].get(k, 0.0) for r in records)
                       for k in ("prompt", "prefill", "generate", "alignment", "postprocess", "rerank")}
    if scheduler is not None:
        row["scheduler_cpu_us_per_request_step"] = scheduler_cpu_s[0] * 1e6 / max(1, steps)
        # busy minus CPU: the scheduler thread ready to run but not running (the GIL held by the
        # requests' threads, or the machine's other processes); the gather's waits left out
        row["scheduler_busy_us_per_request_step"] = scheduler_busy_s[0] * 1e6 / max(1, steps)
        decodes = scheduler.stats.decode_records()
        if decodes:
            row["requests_per_step"] = statistics.fmean(len(r.rows) for r in decodes)
            row["rows_per_step"] = statistics.fmean(sum(r.rows) for r in decodes)
            row["scheduler_steps"] = len(decodes)
            # the longest stretch of the loops' picks after one step, in the scheduler's own CPU time
            # (its wall time here also holds the GIL waits of 2 cores under every typist's thread)
            picks = [r.picks_cpu_ms for r in decodes]
            row["picks_cpu_max_ms"], row["picks_cpu_p99_ms"] = max(picks), percentile(picks, 99)
    if profiles is not None:
        row["profile"] = profiles.top()
    return row


def median_row(runs: list[dict]) -> dict:
    """Each number the median over the rounds; the rest (and the profile) from the first."""
    row = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, float):
            row[key] = statistics.median(r[key] for r in runs if key in r)
        elif key == "stage_ms":
            row[key] = {k: statistics.median(r[key][k] for r in runs) for k in value}
    row["rounds"] = len(runs)
    return row


def compare(rows: list[dict], variants: list[str]) -> None:
    for r in rows:
        same = [o for o in rows if o["vocab"] == r["vocab"] and o["users"] == r["users"]]
        seq = next((o for o in same if o["variant"] == "sequential"), None)
        first = next((o for o in same if o["variant"] == variants[0]), None)
        if seq is not None and r is not seq:
            r["keystrokes_per_s_vs_sequential"] = r["keystrokes_per_s"] / seq["keystrokes_per_s"]
        if first is not None and r is not first:
            r[f"host_us_vs_{variants[0]}"] = r["host_us_per_request_step"] / first["host_us_per_request_step"]
            r[f"host_cpu_us_vs_{variants[0]}"] = (r["host_cpu_us_per_request_step"]
                                                  / first["host_cpu_us_per_request_step"])
        one = next((o for o in rows if o["vocab"] == r["vocab"] and o["variant"] == r["variant"]
                    and o["users"] == 1), None)
        if one is not None and r is not one:
            r["p95_vs_one_user"] = r["p95_ms"] / one["p95_ms"]


def run(args) -> int:
    from codecomplete.bench.latency import _language
    from codecomplete.bench.serve_gpu import long_document

    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"bench host: unknown variant(s) {', '.join(unknown)} ({', '.join(VARIANTS)})")
    try:
        vocabs = [int(v) for v in args.vocab.split(",") if v]
        users_list = [int(u) for u in args.users.split(",") if u]
    except ValueError as e:
        raise SystemExit(f"bench host: --vocab and --users are comma-separated integers ({e})") from e
    if not vocabs or not users_list or min(users_list) < 1 or args.keystrokes < 1 or args.new_tokens < 1:
        raise SystemExit("bench host: --vocab, --users, --keystrokes and --new-tokens must be positive")
    path = str(Path(args.file))
    language = _language(path, "")
    suffix_tokens = args.context_tokens // 4
    options = CompletionOptions(n=args.n, max_new_tokens=args.new_tokens, multiline=False,
                                prefix_tokens=args.context_tokens - suffix_tokens, suffix_tokens=suffix_tokens,
                                deadline_ms=600_000.0)
    result: dict = {"benchmark": "host-overhead", "settings": {k: getattr(args, k) for k in (
        "keystrokes", "n", "new_tokens", "context_tokens", "gather_ms", "rounds", "seed", "rows")}, "rows": []}
    for vocab in vocabs:
        t0 = time.perf_counter()
        runtime = stand_in(vocab, args.context_tokens, args.new_tokens, args.seed, args.rows)
        doc = long_document(Path(path).read_text(encoding="utf-8"), runtime.tokenizer, args.context_tokens)
        progress(f"bench host: vocab {vocab} ready in {time.perf_counter() - t0:.1f} s")
        for users in users_list:
            runs: dict[str, list[dict]] = {v: [] for v in variants}
            for _ in range(max(1, args.rounds)):  # in turn: a load change on the machine hits every variant
                for variant in variants:
                    runs[variant].append(run_row(runtime, variant, users, doc, language, options, args))
            for variant in variants:
                row = median_row(runs[variant])
                result["rows"].append(row)
                progress(f"  {variant:16s} {users:3d} user(s): {row['host_us_per_request_step']:.0f} us a request-step "
                         f"({row['host_cpu_us_per_request_step']:.0f} us CPU), p50 {row['p50_ms']:.1f} ms, "
                         f"{row['keystrokes_per_s']:.1f} keystrokes/s, {row.get('requests_per_step', 1):.1f} "
                         "requests a step")
    compare(result["rows"], variants)
    columns = ["vocab", "variant", "users", "host_us_per_request_step", "host_cpu_us_per_request_step",
               "scheduler_cpu_us_per_request_step", "scheduler_busy_us_per_request_step", "p50_ms", "p95_ms",
               "keystrokes_per_s", "keystrokes_per_s_vs_sequential", f"host_us_vs_{variants[0]}", "requests_per_step"]
    emit(result, args.json, format_table(result["rows"], columns))
    return 0
