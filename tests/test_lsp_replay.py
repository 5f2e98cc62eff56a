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


def test_bench_latency_compares_the_server_with_the_engine_on_the_same_keystrokes(tiny_model_dir, capsys):
    import argparse
    import json

    from codecomplete.bench import latency

    parser = argparse.ArgumentParser()
    latency.add_arguments(parser)
    args = parser.parse_args(["--model", str(tiny_model_dir), "--keystrokes", "6", "--cold", "1", "--n", "2",
                              "--max-tokens", "3", "--lsp", "--json"])
    assert latency.run(args) == 0
    result = json.loads(capsys.readouterr().out)
    engine_kinds = [k["kind"] for k in result["engine"]["keystrokes"]]
    lsp_kinds = [k["source"] for k in result["lsp"]["keystrokes"]]
    assert len(engine_kinds) == len(lsp_kinds) == 6 and set(lsp_kinds) <= {"warm", "cache", "cold"}
    assert result["lsp"]["multiline"] == "never" and result["cold_p50_ms"] > 0
    warm_both = sum(e == "warm" and s == "warm" for e, s in zip(engine_kinds, lsp_kinds, strict=True))
    assert result["lsp_warm_paired_keystrokes"] == warm_both
