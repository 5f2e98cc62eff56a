"""The simulated typists of the serving benchmarks: users typing together start once every
file is open, so the first keystrokes do not queue behind N cold prompts."""

from __future__ import annotations

import threading
import time

from codecomplete.bench.typists import Typing, keystrokes_per_s, type_together
from codecomplete.request import CompletionOptions

TEXT = "".join(f"line_{i} = {i}\n" for i in range(200))


def test_typing_starts_after_every_open_and_records_each_keystroke():
    opens: dict[str, float] = {}
    lock = threading.Lock()

    def send(request):
        user = request.path.split("/")[0]
        with lock:
            first = user not in opens
            if first:
                opens[user] = 0.0
        if first:  # the open: user0's is slow, a cold prompt of a long file
            time.sleep(0.3 if user == "user0" else 0.01)
            opens[user] = time.perf_counter()
        return {"status": 200}

    records, wall_s = type_together([send] * 3, TEXT, "f.py", "python", Typing(4, 5.0, 5.0), CompletionOptions(),
                                    seed=1)
    assert len(records) == 12 and {r["user"] for r in records} == {0, 1, 2}
    slowest_open = max(opens.values())
    assert min(r["t0"] for r in records) >= slowest_open  # nobody typed before user0's file was open
    assert wall_s >= 0.3 and keystrokes_per_s(records) > 0
