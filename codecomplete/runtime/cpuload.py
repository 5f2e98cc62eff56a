"""How much of the machine other processes are using: picks the decode thread policy.

On an idle machine the fastest decode uses every physical core with worker threads that
spin between the graph's ops (a sleeping worker costs a wake-up per op, ~300 a step). When
another program keeps a core busy, spinning workers wait on a thread that is not running,
and one thread without spinning is fastest. `codecomplete bench latency --threads
adaptive,nospin,single [--busy 1]` on a 2-core machine, the same keystrokes in turn, warm
keystroke time per keystroke against adaptive: idle, workers sleeping between ops 1.21x and
one thread 1.22x; one other busy process, sleeping workers 1.13x and one thread (what
adaptive then uses) 0.96x. The runtime asks before each request.
"""

from __future__ import annotations

import os
import time

BUSY_SHARE = 0.25  # other processes using over a quarter of all cores: the machine is busy
MIN_INTERVAL_S = 0.05  # shorter intervals say nothing; the previous reading stands


def _proc_stat_busy() -> float | None:
    """CPU seconds all processes have used since boot (Linux), None elsewhere."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != b"cpu":
        return None
    ticks = [int(x) for x in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    # user nice system idle iowait irq softirq steal: steal (a neighbouring guest) is busy too
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuLoad:
    """The share of all cores that other processes used since the previous reading."""

    def __init__(self, cores: int | None = None, clock=time.monotonic, own_cpu=time.process_time,
                 busy_total=_proc_stat_busy):
        self.cores = cores or os.cpu_count() or 1
        self._clock, self._own, self._busy = clock, own_cpu, busy_total
        self._last = self._sample()
        self.share = 0.0

    def _sample(self) -> tuple[float, float, float | None]:
        return self._clock(), self._own(), self._busy()

    def others(self) -> float:
        """Other processes' share of all cores (0..1) since the last call (or the last one
        at least MIN_INTERVAL_S ago); 0 where the system does not say (no /proc/stat)."""
        now = self._sample()
        wall = now[0] - self._last[0]
        if now[2] is None or self._last[2] is None:
            return 0.0
        if wall >= MIN_INTERVAL_S:
            busy = (now[2] - self._last[2]) - (now[1] - self._last[1])
            self.share = min(1.0, max(0.0, busy / (wall * self.cores)))
            self._last = now
        return self.share

    def busy(self) -> bool:
        return self.others() > BUSY_SHARE
