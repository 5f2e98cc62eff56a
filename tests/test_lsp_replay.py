"""lsp/replay.py: typing replay through the real server process (fake engine: protocol only)."""

from __future__ import annotations

import pytest

from codecomplete.lsp.replay import default_start, run_lsp_replay
from codecomplete.models.testing import SAMPLE_CODE

FAKE = "codecomplete.lsp.testing:fake_engine"


def test_replay_reports_latency_percentiles_per_keystroke(tmp_path):
    path = tmp_path / "sample.py"
    path.write_text(SAMPLE_CODE)
    result = run_lsp_replay(path, "python", n=2, max_tokens=4, keystrokes=8, engine_factory=FAKE, keep_suffix=True)
    assert result["requests"] == 8 == len(result["latencies_ms"])
    assert result["errors"] == 0 and result["answered"] + result["empty"] == 8
    assert 0 < result["p50_ms"] <= result["p95_ms"] <= result["max_ms"]
    assert result["load_ms"] > 0 and result["n"] == 2
    # every sequential answer is attributed to how the server produced it
    assert sum(v["count"] for v in result["by_source"].values()) == 8
    assert set(result["by_source"]) <= {"cache", "warm", "cold"} and result["multiline"] == "auto"


def test_replay_of_a_broken_model_raises_with_the_servers_message(tmp_path):
    path = tmp_path / "sample.py"
    path.write_text(SAMPLE_CODE)
    with pytest.raises(RuntimeError, match="no such model folder"):
        run_lsp_replay(path, "python", 1, 4, 3, model=str(tmp_path / "missing"), engine_factory=FAKE)


def test_default_start_is_a_line_start_with_room_to_type():
    start = default_start(SAMPLE_CODE, 20)
    assert SAMPLE_CODE[start - 1] == "\n" and len(SAMPLE_CODE) - start >= 20
