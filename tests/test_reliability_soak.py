"""A short soak (5 s at 15 keys/s, fake engine): no backlog, bounded RSS; `codecomplete bench soak` runs it long."""

from __future__ import annotations

import json
import os
from pathlib import Path

from codecomplete.bench.soak import soak

SOURCE = Path(__file__).resolve().parents[1] / "codecomplete" / "engine.py"


def test_typing_at_15_keys_per_second_builds_no_backlog_and_rss_stays_bounded():
    env = {**os.environ, "CODECOMPLETE_FAKE_STEP_MS": "1"}
    result = soak(SOURCE, rate_hz=15.0, seconds=5.0, engine_factory="codecomplete.lsp.testing:fake_engine", env=env)
    print(json.dumps({k: result[k] for k in ("seconds", "requests", "answered", "empty", "p95_ms",
                                              "rss_start_mb", "rss_end_mb", "backlog")}))
    assert result["requests"] == 75
    assert result["unanswered"] == 0 and result["errors"] == 0
    assert not result["backlog"]
    assert result["answered"] > 0
    assert result["rss_end_mb"] - result["rss_start_mb"] < 50
    assert result["server_alive_at_end"] and result["exit_code"] == 0
    assert result["stdout_garbage"] == 0
