"""One replica, many typists, in process (no Ray, no HTTP): `bench serve --device cuda|cpu`.

    codecomplete bench serve --device cuda --users 1,8,32,64 \\
        --variants sequential,batched-plain,batched-bifurcated --model random-7b --n 4 \\
        --new-tokens 16 --context-tokens 2048 --json --plot serve_gpu.png

U simulated typists (bench/typists.py: their own place in a file, about --interval-ms
between keystrokes, pauses) send each keystroke as one Engine.complete with --n candidates
and exactly --new-tokens decoded tokens (Engine.exact_new_tokens: no stop rule, patience or
deadline ends a candidate early, and no typing-as-suggested answer skips the model; keystroke
reuse is off: each keystroke does the same work, whatever the weights), over prompts of about
--context-tokens tokens. Variants: sequential (batching off: the requests queue on the
engine's lock), batched-plain and batched-bifurcated (batching on; the torch runtime's
decode_many attends each row to its context on its own, or each context once for all its
rows). Per row: keystroke p50/p95, keystrokes/s, the decode step (mean, p95, rows and
requests per step), the others' step while prefill chunks run between steps, GPU memory,
and the step's memory-traffic floor (runtime/traffic.py over the measured copy bandwidth).
--cold-every-s S adds a client that sends a cold prompt of --cold-tokens tokens every S
seconds: each row then runs without and with it.

The `service` variant (with --url, a team server started with `codecomplete serve
--exact-new-tokens N` for the same model) sends the same typists' keystrokes — same
documents, keystroke times, options — to the server through the language server's remote
engine (codecomplete/remote.py: X-Session-Id, one hop), after the in-process variants have
run and freed their device memory. Its rows carry the ratios to an in-process variant of
the same users, paired by keystroke, and the share of keystrokes answered alike.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from codecomplete.batching import GATHER_MS, PREFILL_CHUNK_TOKENS, IterationRecord
from codecomplete.bench.common import GcPauses, emit, format_table, percentile, progress
from codecomplete.bench.typists import Typing, keystrokes_per_s, type_together
from codecomplete.request import CompletionOptions, CompletionRequest
from codecomplete.runtime import DEVICES

# variant -> (Engine batching, the runtime's batch_attention)
VARIANTS = {"sequential": ("off", "bifurcated"), "batched-plain": ("on", "plain"),
            "batched-bifurcated": ("on", "bifurcated"), "batched-inline-rerank": ("on", "bifurcated"),
            "batched-eager-prefill": ("on", "bifurcated")}
# variants whose reranker runs in the request's thread (the others: --rerank-workers processes,
# a GPU replica's default); batched-inline-rerank is batched-bifurcated without the processes
INLINE_RERANK = {"sequential", "batched-inline-rerank"}
# batched-bifurcated whose prefill chunks run between decode steps, eagerly, instead of
# riding the step (the graphs' fused chunks, TorchRuntime(fused_chunk_tokens=))
EAGER_PREFILL = {"batched-eager-prefill"}
SERVICE = "service"  # the team server at --url, the same typists over HTTP
VARIANT_NAMES = (*VARIANTS, SERVICE)
# the in-process variant a service row is compared with: the first of these that ran
SERVICE_REFERENCES = ("batched-bifurcated", "batched-plain", "sequential")
# the server ignores deadlines in exact mode; the client must not give up first (it waits
# the deadline plus a grace)
SERVICE_DEADLINE_MS = 60_000.0
RANDOM_7B = "random-7b"
COLD_IN_FLIGHT = 4  # cold prompts still running when the next is due: the next waits


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The in-process options (bench serve's parser holds them next to its HTTP ones)."""
    p.add_argument("--device", default=None, choices=DEVICES,
                   help="run in process on this device (no Ray, no HTTP): the batch scheduler's benchmark")
    p.add_argument("--variants", default="sequential,batched-bifurcated",
                   help=f"with --device, comma-separated: {', '.join(VARIANT_NAMES)} ({SERVICE}: the server at "
                        "--url, started with --exact-new-tokens N)")
    p.add_argument("--model", default=None,
                   help=f"with --device: a model folder or GGUF, or {RANDOM_7B} (Qwen2.5-Coder-7B-shaped, random "
                        "weights); default the shipped model")
    p.add_argument("--layers", type=int, default=0, help=f"{RANDOM_7B}: layers (default 28)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="with --device: float weights (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--new-tokens", type=int, default=16, help="with --device: tokens decoded per keystroke, exactly")
    p.add_argument("--context-tokens", type=int, default=2048, help="with --device: prompt tokens (prefix + suffix)")
    p.add_argument("--prefill-chunk-tokens", type=int, default=PREFILL_CHUNK_TOKENS,
                   help="with --device: prompt tokens prefilled between two decode steps (no decode running, "
                        "or batched-eager-prefill)")
    p.add_argument("--fused-chunk-tokens", type=int, default=256,
                   help="with --device cuda: a prompt chunk's tokens that ride a decode step (0: none)")
    p.add_argument("--gather-ms", type=float, default=GATHER_MS,
                   help="with --device: how long a batched step waits for the requests of the last one")
    p.add_argument("--rerank-workers", type=int, default=None,
                   help="with --device: rerank processes of the batched variants (default: a GPU replica's, "
                        "a quarter of the cores, at most 4); batched-inline-rerank and sequential rerank in place")
    p.add_argument("--max-row-s", type=float, default=30.0,
                   help="with --device: a user starts no keystroke later than this after its first one")
    p.add_argument("--cold-every-s", type=float, default=0.0,
                   help="with --device: also run each row with a cold prompt arriving this often (0: never)")
    p.add_argument("--cold-tokens", type=int, default=4096, help="with --device: a cold prompt's tokens")
    p.add_argument("--repeat", type=int, default=1,
                   help="with --device: run each variant's rows this many times in turn, on the same engine; the "
                        "JSON's repeats give each figure's median and range")
    p.add_argument("--keep-records", action="store_true",
                   help="with --device: each keystroke's record in the JSON rows (keystroke_records: its time, "
                        "prompt tokens prefilled, engine stages), to study the tail")
    p.add_argument("--copy-gbps", type=float, default=0.0,
                   help="with --device: copy bandwidth (GB/s read + written) for the floor; default measured")


class Runtimes:
    """One set of weights; a torch runtime per batch attention, built when first asked for
    (the previous one dropped, so only one holds its device buffers at a time)."""

    def __init__(self, args):
        import torch

        self.device = args.device
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("bench serve: --device cuda, but torch sees no CUDA device")
        self.precision = args.precision if args.precision != "auto" else "bf16" if self.device == "cuda" else "fp32"
        if args.model == RANDOM_7B:
            from codecomplete.models.testing import (
                qwen7b_shape_config,
                random_torch_model,
                standin_tokenizer,
            )

            longest = max(args.context_tokens, args.cold_tokens if args.cold_every_s else 0)
            # suffix first (SPM): typing changes only the prompt's end, so a keystroke prefills a
            # token or two; Qwen's own order (PSM) would re-prefill the whole suffix each time,
            # and random weights do not care which order they were "trained" in
            overrides = {"max_seq_len": longest + args.new_tokens + 64, "fim_order": "spm",
                         **({"n_layers": args.layers} if args.layers else {})}
            cfg = qwen7b_shape_config(**overrides)
            self.model = random_torch_model(cfg, self.device, self.precision)
            self.tokenizer = standin_tokenizer(cfg)
        else:
            from codecomplete.models.format.source import load_model_source
            from codecomplete.runtime.torch import build_torch_model

            source = load_model_source(args.model, precision=self.precision)
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.precision]
            self.model = build_torch_model(source, self.device, dtype)
            self.tokenizer = source.tokenizer
        self.config = self.model.cfg
        self.fused_chunk_tokens = args.fused_chunk_tokens
        self._built: tuple[str, object] | None = None

    def release(self) -> None:
        """Drop the weights and the runtime built last, and give their device memory back."""
        self.model = self._built = None
        self.free()

    def get(self, batch_attention: str):
        from codecomplete.runtime.torch import TorchRuntime

        if self._built is not None and self._built[0] == batch_attention:
            return self._built[1]
        self._built = None
        self.free()
        # "plain" is the runtime's baseline option (TorchRuntime(batch_attention=)); the default is bifurcated
        kwargs = {"batch_attention": batch_attention} if batch_attention != "bifurcated" else {}
        rt = TorchRuntime.from_model(self.model, self.tokenizer, device=self.device, precision=self.precision,
                                     fused_chunk_tokens=self.fused_chunk_tokens, **kwargs)
        if rt.graphs is not None:  # each replay's device time into the steps' records (replay_ms)
            rt.graphs.time_replays = True
        self._built = (batch_attention, rt)
        return rt

    def free(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()


class StepRecorder:
    """The sequential variant's decode steps, recorded as the scheduler records its own (a
    runtime that reduces rows on its device takes one typist's steps through
    decode_many_top, the others through decode)."""

    METHODS = ("decode", "decode_many_top")

    def __init__(self, runtime):
        self.runtime, self.records = runtime, []
        self._calls = {name: getattr(runtime, name) for name in self.METHODS}
        self._own = {name: vars(runtime).get(name) for name in self.METHODS}  # an instance's own (a wrapper)

    def _record(self, steps, call):
        graphs = getattr(self.runtime, "graphs", None)
        replayed = getattr(graphs, "replay_ms", None)
        cpu0, t0 = time.thread_time(), time.perf_counter()
        out = call()
        ms = (time.perf_counter() - t0) * 1000.0
        for s in steps:
            self.records.append(IterationRecord(
                t0, ms, ms, 0.0, 0, 0, (s.branches.n,), (len(s.context.tokens),), (s.branches.step,),
                replay_ms=graphs.replay_ms - replayed if replayed is not None else 0.0,
                decode_cpu_ms=(time.thread_time() - cpu0) * 1000.0))
        return out

    def __enter__(self):
        from codecomplete.runtime.base import DecodeStep

        decode, many_top = self._calls["decode"], self._calls["decode_many_top"]
        self.runtime.decode = lambda context, branches, next_tokens: self._record(
            [DecodeStep(context, branches, next_tokens)], lambda: decode(context, branches, next_tokens))
        def decode_many_top(steps, *args, **kwargs):
            steps = list(steps)
            return self._record(steps, lambda: many_top(steps, *args, **kwargs))

        self.runtime.decode_many_top = decode_many_top
        return self

    def __exit__(self, *exc):
        for name in self.METHODS:
            if self._own[name] is not None:
                setattr(self.runtime, name, self._own[name])
            else:
                delattr(self.runtime, name)  # the class's method again


def long_document(text: str, tokenizer, tokens: int) -> str:
    """The file repeated until each user's place in its second half has `tokens` before it."""
    per_copy = max(1, len(tokenizer.encode(text)))
    copies = max(2, -(-2 * tokens // per_copy) + 1)
    return text * copies


def _answer_fields(c) -> dict:
    """A record's fields from a Completion (the candidates' texts and lengths: to compare answers)."""
    return {"status": 200, "source": c.source, "new_tokens": c.prefill_new_tokens, "tokens": c.tokens_generated,
            "engine_ms": c.timings_ms.get("total"), "stages_ms": dict(c.timings_ms),
            "texts": [x.text for x in c.candidates],
            "candidate_tokens": [x.tokens for x in c.candidates]}


def _sender(engine):
    def send(request: CompletionRequest) -> dict:
        try:
            c = engine.complete(request)
        except Exception as e:  # counted as an error; the row goes on
            return {"status": 500, "error": type(e).__name__}
        return _answer_fields(c)
    return send


def _remote_sender(remote):
    """A typist's send through the remote engine (None answers: failed, busy or paused)."""
    def send(request: CompletionRequest) -> dict:
        c = remote.complete(request)
        if c is None:
            return {"status": 0, "error": remote.message}
        return _answer_fields(c)
    return send


class ColdClient:
    """A cold prompt (a new document) every `every_s` seconds, each in its own thread."""

    def __init__(self, engine, text: str, language: str, every_s: float, options: CompletionOptions):
        self.engine, self.text, self.language, self.every_s, self.options = engine, text, language, every_s, options
        self.ms: list[float] = []
        self.prompt_tokens: list[int] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop = threading.Thread(target=self._run, daemon=True)

    def _one(self, i: int) -> None:
        lines = [k for k, ch in enumerate(self.text) if ch == "\n"]
        offset = lines[len(lines) * 3 // 4 + i % max(1, len(lines) // 8)] + 1
        request = CompletionRequest(text=self.text, offset=offset, language=self.language, path=f"cold{i}/file.py",
                                    options=self.options)
        t0 = time.perf_counter()
        c = self.engine.complete(request)
        self.ms.append((time.perf_counter() - t0) * 1000.0)
        self.prompt_tokens.append(c.prefill_new_tokens + c.prefill_reused_tokens)

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(self.every_s):
            self._threads = [t for t in self._threads if t.is_alive()]
            if len(self._threads) >= COLD_IN_FLIGHT:
                continue
            t = threading.Thread(target=self._one, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
            i += 1

    def __enter__(self):
        self._loop.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._loop.join()
        for t in self._threads:
            t.join()


def step_figures(records: list[IterationRecord], config, precision: str, bifurcated: bool, copy_gbps: float
                 ) -> dict:
    """Mean and p95 step time, rows and requests per step, and the mean traffic floor."""
    from codecomplete.runtime.traffic import floor_ms, step_traffic_bytes

    steps = [r for r in records if r.decode_ms > 0]
    if not steps:
        return {}
    floors = [floor_ms(step_traffic_bytes(config, precision, r.contexts, r.rows, bifurcated,
                                          [max(0, b - 1) for b in r.branch_tokens]), copy_gbps) for r in steps]
    step_ms = [r.decode_ms for r in steps]
    return {"steps": len(steps), "step_ms": statistics.fmean(step_ms), "step_p50_ms": percentile(step_ms, 50),
            "decode_p95_ms": percentile(step_ms, 95),
            # of a decode call, the device's time in its graph replays (0 where not timed: no graphs)
            "replay_ms": statistics.fmean(r.replay_ms for r in steps),
            "replay_p95_ms": percentile([r.replay_ms for r in steps], 95),
            # the scheduler thread's CPU time in the call: decode_ms less this and the replay
            # is time it waited, for the GIL among others
            "decode_cpu_ms": statistics.fmean(r.decode_cpu_ms for r in steps),
            # what the other requests wait between two steps: the step plus the prefill chunks
            # and small calls run between steps
            "step_p95_ms": percentile([r.iteration_ms for r in steps], 95),
            # where an iteration's time goes: the decode step, newcomers' prefill chunks, and
            # the rest (the gather's wait, the picks and the loops' Python, small calls)
            "iteration_ms": statistics.fmean(r.iteration_ms for r in steps),
            "prefill_ms_per_iteration": statistics.fmean(r.prefill_ms for r in steps),
            "prefill_tokens_per_iteration": statistics.fmean(r.prefill_tokens for r in steps),
            "fused_prefill_tokens_per_iteration": statistics.fmean(r.fused_tokens for r in steps),
            "gather_ms_per_iteration": statistics.fmean(r.gather_ms for r in steps),
            # of the host's part: the joining loops' first picks (from their prompts' logits), and
            # the stepped loops' picks after the decode
            "first_picks_ms_per_iteration": statistics.fmean(r.first_picks_ms for r in steps),
            "picks_ms_per_iteration": statistics.fmean(r.picks_ms for r in steps),
            "host_ms_per_iteration": statistics.fmean(r.iteration_ms - r.decode_ms - r.prefill_ms - r.gather_ms
                                                      for r in steps),
            # the scheduler thread's time off the CPU in an iteration outside the decode call and
            # the gather: waiting for the GIL (or the machine's other work), not computing
            "host_off_cpu_ms_per_iteration": statistics.fmean(
                max(0.0, (r.iteration_ms - r.gather_ms - r.decode_ms) - (r.iteration_cpu_ms - r.decode_cpu_ms))
                for r in steps),
            "rows_per_step": statistics.fmean(sum(r.rows) for r in steps),
            "requests_per_step": statistics.fmean(len(r.rows) for r in steps),
            "context_tokens_mean": statistics.fmean(m for r in steps for m in r.contexts),
            "floor_ms": statistics.fmean(floors), "step_vs_floor": statistics.fmean(step_ms) / statistics.fmean(floors),
            "steps_by_rows": steps_by_rows(steps, floors),
            "slowest_iterations": slowest_iterations(records)}


SLOWEST = 5  # iterations, and gaps between them, that slowest_iterations lists


def slowest_iterations(records: list[IterationRecord]) -> dict:
    """The longest iterations (with what they ran) and the longest gaps between one
    iteration's end and the next one's start, each at its time since the first record (s):
    a stall that holds every typist shows here even when the step p95 does not see it."""
    if not records:
        return {}
    records = sorted(records, key=lambda r: r.started)
    t0 = records[0].started

    def described(r: IterationRecord) -> dict:
        return {"at_s": r.started - t0, "iteration_ms": r.iteration_ms, "decode_ms": r.decode_ms,
                "gather_ms": r.gather_ms, "prefill_ms": r.prefill_ms, "cpu_ms": r.iteration_cpu_ms,
                "first_picks_ms": r.first_picks_ms, "joined": r.joined, "picks_ms": r.picks_ms,
                "picks_cpu_ms": r.picks_cpu_ms,
                "rows": sum(r.rows), "requests": len(r.rows)}

    gaps = [(b.started - (a.started + a.iteration_ms / 1000.0), a, b) for a, b in zip(records, records[1:], strict=False)]
    gaps.sort(key=lambda g: -g[0])
    return {"iterations": [described(r) for r in sorted(records, key=lambda r: -r.iteration_ms)[:SLOWEST]],
            "gaps": [{"at_s": a.started - t0 + a.iteration_ms / 1000.0, "ms": gap * 1000.0,
                      "next_rows": sum(b.rows)} for gap, a, b in gaps[:SLOWEST]]}


ROW_BANDS = (4, 16, 32, 64, 128, 256)  # steps_by_rows' bands: up to this many rows in the step


def steps_by_rows(steps: list[IterationRecord], floors: list[float]) -> list[dict]:
    """The steps grouped by their rows (bands of ROW_BANDS): how many, their decode and
    iteration times (mean, p95), the device's replay time and the scheduler's CPU time in
    the call (mean, p95), and the floor. Under load the slow steps are the crowded ones, the
    device's, or the host's; this tells which."""
    out, low = [], 0
    for high in ROW_BANDS + (10**9,):
        band = [(r, f) for r, f in zip(steps, floors, strict=True) if low < sum(r.rows) <= high]
        if band:
            decode = [r.decode_ms for r, _ in band]
            iteration = [r.iteration_ms for r, _ in band]
            plain = [r.decode_ms for r, _ in band if not r.fused_tokens]
            out.append({"rows": f"{low + 1}-{high}" if high < 10**9 else f"{low + 1}+", "steps": len(band),
                        "requests_mean": statistics.fmean(len(r.rows) for r, _ in band),
                        "decode_ms": statistics.fmean(decode), "decode_p95_ms": percentile(decode, 95),
                        # steps that a prompt chunk rode (their decode call also prefilled), and
                        # the decode call of the others alone
                        "fused_share": sum(1 for r, _ in band if r.fused_tokens) / len(band),
                        "unfused_decode_ms": statistics.fmean(plain) if plain else None,
                        "unfused_decode_p95_ms": percentile(plain, 95) if plain else None,
                        "replay_ms": statistics.fmean(r.replay_ms for r, _ in band),
                        "replay_p95_ms": percentile([r.replay_ms for r, _ in band], 95),
                        "decode_cpu_ms": statistics.fmean(r.decode_cpu_ms for r, _ in band),
                        "decode_cpu_p95_ms": percentile([r.decode_cpu_ms for r, _ in band], 95),
                        "iteration_ms": statistics.fmean(iteration), "iteration_p95_ms": percentile(iteration, 95),
                        "floor_ms": statistics.fmean(f for _, f in band)})
        low = high
    return out


def latency_figures(records: list[dict]) -> dict:
    """Keystrokes answered and not, latency p50/p95, keystrokes/s, typing-cache share."""
    answered = [r for r in records if r["status"] == 200]
    ms = [r["ms"] for r in answered]
    return {"keystrokes": len(answered), "errors": len(records) - len(answered),
            "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95), "keystrokes_per_s": keystrokes_per_s(answered),
            "cache_share": sum(r["source"] == "cache" for r in answered) / max(1, len(answered)),
            # the engine's own time (the server's, through the service): the rest is the trip to it
            "engine_p50_ms": percentile([r["engine_ms"] for r in answered if r["engine_ms"] is not None], 50),
            # prompt tokens prefilled a keystroke: the same work in process and through the service
            "prefill_new_tokens_mean": statistics.fmean(r["new_tokens"] for r in answered) if answered else None,
            "stages": stage_figures(answered)}


STAGES = ("prompt", "prefill", "generate", "postprocess", "rerank")  # Engine.complete's timings, in order


def stage_figures(answered: list[dict]) -> dict:
    """Where a keystroke's engine time goes: each stage's p50 and p95, and its mean over the
    slowest 5% of keystrokes (by the engine's total) against its mean over the rest. A tail
    that one stage makes shows as that stage's slow/rest ratio."""
    timed = [r for r in answered if r.get("stages_ms") and r["stages_ms"].get("total") is not None]
    if not timed:
        return {}
    cut = percentile([r["stages_ms"]["total"] for r in timed], 95)
    slow = [r for r in timed if r["stages_ms"]["total"] >= cut]
    rest = [r for r in timed if r["stages_ms"]["total"] < cut] or slow
    out = {}
    for name in (*STAGES, "total"):
        ms = [r["stages_ms"].get(name, 0.0) for r in timed]
        out[name] = {"p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
                     "slowest_mean_ms": statistics.fmean(r["stages_ms"].get(name, 0.0) for r in slow),
                     "rest_mean_ms": statistics.fmean(r["stages_ms"].get(name, 0.0) for r in rest)}
    # the client's wait beyond the engine's own time (in process: the engine's per-document turn)
    out["outside_engine_p95_ms"] = percentile([r["ms"] - r["stages_ms"]["total"] for r in timed], 95)
    return out


def run_row(engine, runtime, variant: str, users: int, cold: bool, doc: str, language: str, args,
            options: CompletionOptions, cold_options: CompletionOptions, copy_gbps: float, precision: str) -> dict:
    import torch

    engine.forget()
    if engine.scheduler is not None:
        engine.scheduler.stats.reset()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    typing = Typing(args.keystrokes, args.interval_ms, args.pause_ms, max_s=args.max_row_s)
    recorder = StepRecorder(runtime) if engine.scheduler is None else None
    pool = engine.rerank_pool
    if pool is not None:
        pool.worker_ms.clear()
        in_place = pool.in_place
    cold_client = ColdClient(engine, doc, language, args.cold_every_s, cold_options) if cold else None
    with recorder or nullcontext(), cold_client or nullcontext(), GcPauses() as pauses:
        records, wall_s = type_together([_sender(engine)] * users, doc, "file.py", language, typing, options,
                                        args.seed)
    steps = recorder.records if recorder is not None else list(engine.scheduler.stats.records)
    if records:  # the steps while the users typed (their files' opening prefills came before)
        typing_from = min(r["t0"] for r in records)
        steps = [s for s in steps if s.started >= typing_from]
    row = {"variant": variant, "users": users, "cold_every_s": args.cold_every_s if cold else 0,
           "rerank_workers": engine.describe()["rerank_workers"],
           **latency_figures(records), "wall_s": wall_s, "gc_pauses": pauses.figures(),
           **step_figures(steps, runtime.config, precision, VARIANTS[variant][1] == "bifurcated", copy_gbps),
           "records": records}
    if "floor_ms" in row:  # a keystroke decodes new_tokens steps: their floor
        row["keystroke_floor_ms"] = args.new_tokens * row["floor_ms"]
        row["p50_vs_keystroke_floor"] = row["p50_ms"] / row["keystroke_floor_ms"]
    if args.device == "cuda":
        row["gpu_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if pool is not None:  # the rerank workers' own time per request (the stage's rest: pipes, GIL)
        worker_ms = list(pool.worker_ms)
        row["rerank_pooled"], row["rerank_in_place"] = len(worker_ms), pool.in_place - in_place
        row["rerank_worker_p50_ms"] = percentile(worker_ms, 50) if worker_ms else None
        row["rerank_worker_p95_ms"] = percentile(worker_ms, 95) if worker_ms else None
    if cold_client is not None:
        row["cold_prompts"] = len(cold_client.ms)
        row["cold_p50_ms"] = percentile(cold_client.ms, 50)
        row["cold_prompt_tokens_mean"] = statistics.fmean(cold_client.prompt_tokens) if cold_client.ms else None
    return row


def check_service(args, doc: str, language: str, options: CompletionOptions) -> str:
    """Warm the server up (3 keystrokes) and make sure it decodes exactly --new-tokens a
    keystroke; its public URL. SystemExit with the reason otherwise."""
    from codecomplete.remote import RemoteEngine

    try:
        remote = RemoteEngine(args.url, args.api_key or "")
    except ValueError as e:
        raise SystemExit(f"bench serve: --url: {e}") from None
    try:
        if remote.state != "ready":
            raise SystemExit(f"bench serve: {remote.message}")
        warm = Typing(3, args.interval_ms / 3, 0.0)
        records, _ = type_together([_remote_sender(remote)], doc, "warmup.py", language, warm, options, args.seed)
    finally:
        remote.close()
    answered = [r for r in records if r["status"] == 200]
    if not answered:
        raise SystemExit(f"bench serve: the server answered none of 3 warm-up keystrokes ({remote.message})")
    lengths = {t for r in answered for t in r["candidate_tokens"]}
    if lengths - {args.new_tokens}:
        raise SystemExit(f"bench serve: the server's candidates hold {sorted(lengths)} tokens, not exactly "
                         f"--new-tokens {args.new_tokens}: start it with `codecomplete serve --exact-new-tokens "
                         f"{args.new_tokens}` (and --runtime torch, the same --model)")
    return remote.url


def run_service_row(users: int, doc: str, language: str, args, options: CompletionOptions) -> dict:
    """The typists of an in-process row, each through its own remote engine (connection)."""
    from codecomplete.remote import RemoteEngine

    remotes = [RemoteEngine(args.url, args.api_key or "", check_health=False) for _ in range(users)]
    typing = Typing(args.keystrokes, args.interval_ms, args.pause_ms, max_s=args.max_row_s)
    try:
        records, wall_s = type_together([_remote_sender(r) for r in remotes], doc, "file.py", language, typing,
                                        options, args.seed)
    finally:
        for r in remotes:
            r.close()
    return {"variant": SERVICE, "users": users, "cold_every_s": 0, **latency_figures(records), "wall_s": wall_s,
            "records": records}


def compare_service(rows: list[dict]) -> None:
    """Each service row against an in-process row of the same users (SERVICE_REFERENCES):
    p50/p95 over the keystrokes both answered (same user, same cursor), the per-keystroke
    ratio's p50/p95, keystrokes/s, and the share of those keystrokes answered alike."""
    for row in (r for r in rows if r["variant"] == SERVICE):
        local = next((r for v in SERVICE_REFERENCES for r in rows
                      if (r["variant"], r["users"], r["cold_every_s"]) == (v, row["users"], 0)), None)
        if local is None:
            continue
        answered = {(r["user"], r["offset"]): r for r in local["records"] if r["status"] == 200}
        pairs = [(r, answered[(r["user"], r["offset"])]) for r in row["records"]
                 if r["status"] == 200 and (r["user"], r["offset"]) in answered]
        row["in_process_variant"] = local["variant"]
        row["paired_keystrokes"] = len(pairs)
        row["keystrokes_per_s_vs_in_process"] = (row["keystrokes_per_s"] / local["keystrokes_per_s"]
                                                 if local["keystrokes_per_s"] else None)
        if not pairs:
            continue
        served, alone = [a["ms"] for a, _ in pairs], [b["ms"] for _, b in pairs]
        row["p50_vs_in_process"] = percentile(served, 50) / percentile(alone, 50)
        row["p95_vs_in_process"] = percentile(served, 95) / percentile(alone, 95)
        ratios = [a / b for a, b in zip(served, alone, strict=True) if b > 0]
        row["paired_ratio_p50"] = percentile(ratios, 50)
        row["paired_ratio_p95"] = percentile(ratios, 95)
        row["same_answers_share"] = sum(a["texts"] == b["texts"] for a, b in pairs) / len(pairs)


def compare(rows: list[dict]) -> None:
    """Each row against its variant's one-typist row, the sequential row and the plain one
    of the same users, within the same repeat (the issue's targets are such ratios)."""
    def find(variant, users, cold, repeat):
        return next((r for r in rows if (r["variant"], r["users"], bool(r["cold_every_s"]), r.get("repeat", 0))
                     == (variant, users, cold, repeat)), None)

    ratio = lambda a, b: a / b if a and b else None  # noqa: E731
    for r in rows:
        cold, repeat = bool(r["cold_every_s"]), r.get("repeat", 0)
        one = find(r["variant"], 1, cold, repeat)
        if one is not None and r is not one:
            r["step_vs_one_typist"] = ratio(r.get("step_ms"), one.get("step_ms"))
            r["p95_vs_one_typist"] = ratio(r["p95_ms"], one["p95_ms"])
        seq = find("sequential", r["users"], cold, repeat)
        if seq is not None and r is not seq:
            r["keystrokes_per_s_vs_sequential"] = ratio(r["keystrokes_per_s"], seq["keystrokes_per_s"])
        plain = find("batched-plain", r["users"], cold, repeat)
        if r["variant"] == "batched-bifurcated" and plain is not None:
            r["keystrokes_per_s_vs_plain"] = ratio(r["keystrokes_per_s"], plain["keystrokes_per_s"])
            # plain's step over this one, and the most a step could gain at these rows and
            # contexts: plain's memory-traffic floor over bifurcated's (the weights are read
            # by both; only the contexts' keys are read once per request instead of per row)
            r["step_speedup_vs_plain"] = ratio(plain.get("step_ms"), r.get("step_ms"))
            r["floor_speedup_vs_plain"] = ratio(plain.get("floor_ms"), r.get("floor_ms"))
        inline = find("batched-inline-rerank", r["users"], cold, repeat)
        if r["variant"] == "batched-bifurcated" and inline is not None:
            r["keystrokes_per_s_vs_inline_rerank"] = ratio(r["keystrokes_per_s"], inline["keystrokes_per_s"])
            r["p95_vs_inline_rerank"] = ratio(r["p95_ms"], inline["p95_ms"])
        eager = find("batched-eager-prefill", r["users"], cold, repeat)
        if r["variant"] == "batched-bifurcated" and eager is not None and cold:
            r["step_p95_vs_eager_prefill"] = ratio(r.get("step_p95_ms"), eager.get("step_p95_ms"))
            r["p95_vs_eager_prefill"] = ratio(r["p95_ms"], eager["p95_ms"])
        if cold:
            quiet = find(r["variant"], r["users"], False, repeat)
            if quiet is not None:
                r["step_p95_vs_no_cold"] = ratio(r.get("step_p95_ms"), quiet.get("step_p95_ms"))


REPEATED = ("p50_ms", "p95_ms", "keystrokes_per_s", "step_ms", "p95_vs_one_typist", "step_vs_one_typist",
            "keystrokes_per_s_vs_plain")  # the figures repeat_summary spreads


def repeat_summary(rows: list[dict]) -> list[dict]:
    """With --repeat N: per (variant, users, cold prompts) the median, lowest and highest of
    each REPEATED figure over its N rows (one process, the same engine: what a single call
    to a GPU machine can say about the spread)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "repeat" in r:
            groups.setdefault((r["variant"], r["users"], r["cold_every_s"]), []).append(r)
    out = []
    for (variant, users, cold), same in groups.items():
        if len(same) < 2:
            continue
        entry = {"variant": variant, "users": users, "cold_every_s": cold, "repeats": len(same)}
        for key in REPEATED:
            values = [r[key] for r in same if r.get(key) is not None]
            if values:
                entry[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        out.append(entry)
    return out


def run(args, users_list: list[int], variants: list[str]) -> int:
    """bench serve --device: every (variant, users[, cold prompts]) row, in that order; the
    service's rows last, once the in-process engines have given their memory back."""
    from codecomplete.engine import Engine

    if args.new_tokens < 1 or args.context_tokens < 16 or args.keystrokes < 1 or args.repeat < 1:
        raise SystemExit("bench serve: --new-tokens, --keystrokes and --repeat must be at least 1, --context-tokens 16")
    if (SERVICE in variants) != bool(args.url):
        raise SystemExit(f"bench serve: the {SERVICE} variant and --url go together (--device with --url: "
                         f"--variants ...,{SERVICE})")
    local_variants = [v for v in variants if v != SERVICE]
    progress(f"bench serve (in process, {args.device}): loading {args.model or 'the shipped model'}")
    t0 = time.perf_counter()
    runtimes = Runtimes(args) if local_variants else None
    tokenizer = runtimes.tokenizer if runtimes is not None else bench_tokenizer(args)
    progress(f"  {'weights' if runtimes is not None else 'tokenizer'} ready in {time.perf_counter() - t0:.1f} s")
    if args.copy_gbps or not local_variants:
        copy_gbps = args.copy_gbps
    else:
        from codecomplete.bench.decode import measure_copy_gbps

        copy_gbps = measure_copy_gbps(args.device)
    path = str(Path(args.file))
    from codecomplete.bench.latency import _language

    language = _language(path, args.language)
    longest = max(args.context_tokens, args.cold_tokens if args.cold_every_s else 0)
    doc = long_document(Path(path).read_text(encoding="utf-8"), tokenizer, longest)
    suffix_tokens = args.context_tokens // 4
    options = CompletionOptions(n=args.n, max_new_tokens=args.new_tokens, deadline_ms=args.deadline_ms,
                                multiline=False, prefix_tokens=args.context_tokens - suffix_tokens,
                                suffix_tokens=suffix_tokens)
    cold_options = replace(options, prefix_tokens=args.cold_tokens - args.cold_tokens // 4,
                           suffix_tokens=args.cold_tokens // 4)
    names = ("keystrokes", "interval_ms", "pause_ms", "n", "new_tokens", "context_tokens", "prefill_chunk_tokens",
             "fused_chunk_tokens", "gather_ms", "max_row_s", "cold_every_s", "cold_tokens", "seed")
    settings = {k: getattr(args, k) for k in names}
    result: dict = {"benchmark": "serve-in-process", "device": args.device, "model": args.model or "default",
                    "precision": runtimes.precision if runtimes is not None else args.precision,
                    "copy_gbps": copy_gbps, "settings": settings, "rows": []}
    if args.device == "cuda":
        import torch

        result["gpu"] = torch.cuda.get_device_name()
    colds = [False, True] if args.cold_every_s > 0 else [False]
    attentions = list(dict.fromkeys(VARIANTS[v][1] for v in local_variants))
    # the variants that share a runtime one after the other: each runtime is built once
    for variant in sorted(local_variants, key=lambda v: attentions.index(VARIANTS[v][1])):
        batching, attention = VARIANTS[variant]
        t0 = time.perf_counter()
        runtime = runtimes.get(attention)
        engine = Engine(runtime, batching=batching, prefill_chunk_tokens=args.prefill_chunk_tokens,
                        cached_documents=2 * max(users_list) + 2 * COLD_IN_FLIGHT, gather_ms=args.gather_ms,
                        rerank_workers=0 if variant in INLINE_RERANK else args.rerank_workers,
                        fuse_prefill=variant not in EAGER_PREFILL)
        engine.exact_new_tokens = args.new_tokens
        engine.reuse_keystrokes = False  # every keystroke runs the model: the same work each time
        progress(f"  {variant}: ready in {time.perf_counter() - t0:.1f} s")
        try:
            warm = Typing(3, args.interval_ms / 3, 0.0)  # first calls: allocations, kernel choices
            type_together([_sender(engine)], doc, "warmup.py", language, warm, options, args.seed)
            for repeat, users, cold in [(k, u, c) for k in range(args.repeat) for u in users_list for c in colds]:
                row = run_row(engine, runtime, variant, users, cold, doc, language, args, options, cold_options,
                              copy_gbps, runtimes.precision)
                row["repeat"] = repeat
                result["rows"].append(row)
                progress(f"    {users:3d} user(s){' + cold prompts' if cold else ''}: p50 {row['p50_ms']:.1f} ms, "
                         f"p95 {row['p95_ms']:.1f} ms, {row['keystrokes_per_s']:.1f} keystrokes/s, step "
                         f"{row.get('step_ms', float('nan')):.2f} ms x {row.get('rows_per_step', 0):.1f} rows "
                         f"(floor {row.get('floor_ms', float('nan')):.2f} ms)")
        finally:
            engine.close()
    if runtimes is not None:
        del engine, runtime
        runtimes.release()  # the server's replica has the device to itself from here
    if SERVICE in variants:
        # the server ignores the deadline in exact mode; the remote engine waits that long
        service_options = replace(options, deadline_ms=max(options.deadline_ms, SERVICE_DEADLINE_MS))
        result["url"] = check_service(args, doc, language, service_options)
        progress(f"  {SERVICE}: {result['url']} answers exactly {args.new_tokens} new tokens a keystroke")
        for users in users_list:
            row = run_service_row(users, doc, language, args, service_options)
            result["rows"].append(row)
            progress(f"    {users:3d} user(s): p50 {row['p50_ms']:.1f} ms, p95 {row['p95_ms']:.1f} ms, "
                     f"{row['keystrokes_per_s']:.1f} keystrokes/s, {row['errors']} errors")
    compare(result["rows"])
    compare_service(result["rows"])
    if args.repeat > 1:
        result["repeats"] = repeat_summary(result["rows"])
    for row in result["rows"]:
        records = row.pop("records")
        if args.keep_records:  # each keystroke's answer, times and engine stages (texts left out)
            row["keystroke_records"] = [{k: v for k, v in r.items() if k not in ("texts", "candidate_tokens")}
                                        for r in records]
    columns = ["variant", "users", "cold_every_s", "p50_ms", "p95_ms", "keystrokes_per_s", "step_ms", "step_p95_ms",
               "rows_per_step", "requests_per_step", "floor_ms", "step_vs_floor", "gpu_mem_mib", "errors",
               "p50_vs_in_process", "p95_vs_in_process", "same_answers_share"]
    emit(result, args.json, format_table(result["rows"], columns))
    if args.plot:
        plot(result["rows"], args.plot)
    return 0


def bench_tokenizer(args):
    """The model's tokenizer alone (the service-only run sizes its document with it)."""
    if args.model == RANDOM_7B:
        from codecomplete.models.testing import qwen7b_shape_config, standin_tokenizer

        return standin_tokenizer(qwen7b_shape_config())
    from codecomplete.models.format.source import load_model_source

    return load_model_source(args.model).tokenizer


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    series: dict[str, list[dict]] = {}
    for r in rows:
        series.setdefault(r["variant"] + (" + cold prompts" if r["cold_every_s"] else ""), []).append(r)
    for name, rs in series.items():
        users = [r["users"] for r in rs]
        left.plot(users, [r["p95_ms"] for r in rs], marker="o", label=name)
        right.plot(users, [r["keystrokes_per_s"] for r in rs], marker="o", label=name)
    for ax, label in ((left, "keystroke p95 (ms)"), (right, "keystrokes/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("users typing")
        ax.set_ylabel(label)
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
