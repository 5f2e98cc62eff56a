"""Shared bits of the benchmarks: timing, resident memory, JSON and plot output."""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# the file the typing benchmarks replay by default: a frozen copy of codecomplete/engine.py
# (as of the commit that measured the README's latency rows), so figures stay comparable
# while the real engine.py changes
TYPING_SAMPLE = Path(__file__).resolve().parent / "data" / "typing_sample.py"


def median_ms(fn: Callable[[], object], repeat: int = 10, warmup: int = 2, sync: Callable[[], None] | None = None) -> float:
    """Median wall time of fn() in milliseconds (sync() is called around each run, e.g. CUDA)."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for an empty list."""
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc; 0 where unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def emit(result: dict, as_json: bool, table: str | None = None) -> None:
    """JSON on stdout when asked, else the table (and JSON after it for the record)."""
    if as_json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        if table:
            print(table)
        print(json.dumps(result, indent=2))


def format_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    for r in rows:
        lines.append("  ".join(cell(r.get(c, "")).rjust(w) for c, w in zip(columns, widths, strict=True)))
    return "\n".join(lines)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_prompt_path(path: str | Path) -> str:
    """The name a replayed file gets in prompts: its folder is the workspace, as the
    LSP replay tells the server (prompt.workspace_name), so no machine paths enter."""
    from codecomplete.prompt import workspace_name

    full = Path(path).resolve()
    return workspace_name(str(full), [str(full.parent)])


class GcPauses:
    """The garbage collector's pauses while the block runs (gc.callbacks): how many, how
    many of them full (generation 2), the longest and their total. Every thread waits
    while one runs."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []  # (generation, ms)
        self._start = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append((int(info.get("generation", 0)), (time.perf_counter() - self._start) * 1000.0))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def figures(self) -> dict:
        ms = [m for _, m in self.pauses]
        return {"count": len(ms), "full": sum(1 for g, _ in self.pauses if g == 2),
                "max_ms": max(ms, default=0.0), "total_ms": sum(ms)}
