"""The CPU-load probe and the onnx runtime's thread policy (all cores idle, one thread busy)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from codecomplete.runtime import cpuload
from codecomplete.runtime.cpuload import CpuLoad


class Clocks:
    def __init__(self):
        self.wall = self.own = self.busy = 0.0

    def probe(self, cores=2, has_proc=True):
        return CpuLoad(cores=cores, clock=lambda: self.wall, own_cpu=lambda: self.own,
                       busy_total=(lambda: self.busy) if has_proc else (lambda: None))


def test_share_counts_other_processes_only():
    c = Clocks()
    load = c.probe()
    # 1 s: all processes used 1.5 core-seconds, 1.0 of them ours -> others 0.5 of 2 cores
    c.wall, c.busy, c.own = 1.0, 1.5, 1.0
    assert load.others() == pytest.approx(0.25) and not load.busy()
    c.wall, c.busy, c.own = 2.0, 3.5, 1.2  # others 1.8 core-seconds in 1 s
    assert load.others() == pytest.approx(0.9) and load.busy()
    c.wall += cpuload.MIN_INTERVAL_S / 2  # too short to say: the last reading stands
    assert load.others() == pytest.approx(0.9)


def test_no_proc_stat_means_idle():
    c = Clocks()
    load = c.probe(has_proc=False)
    c.wall = 5.0
    assert load.others() == 0.0 and not load.busy()


def test_the_real_probe_counts_our_own_work_as_ours():
    import time

    busy0, own0 = cpuload._proc_stat_busy(), time.process_time()
    if busy0 is None:
        pytest.skip("no /proc/stat here")
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:  # our own CPU work
        pass
    busy1, own1 = cpuload._proc_stat_busy(), time.process_time()
    # the machine-wide busy time includes ours (clock ticks are 10 ms: allow two of rounding)
    assert busy1 - busy0 >= (own1 - own0) - 0.02


def test_runtime_decodes_on_one_thread_while_the_cpu_is_busy(tiny_model_dir):
    from codecomplete.models.format.source import load_model_source
    from codecomplete.runtime.onnx import OnnxRuntime

    src = load_model_source(tiny_model_dir)
    rt = OnnxRuntime(src, threads=None)
    if not rt.adaptive:
        pytest.skip("a one-core machine has one policy")
    c = Clocks()
    rt._load = c.probe(cores=rt._load.cores)
    tokens = [5, 9, 13, 17, 21, 25]
    c.wall = 1.0  # idle: all cores, spinning
    _, idle_logits = rt.prefill(tokens)
    assert rt._active is rt.session and rt._single is None
    c.wall, c.busy = 2.0, 2.0 * rt._load.cores  # every core busy with other work
    state, busy_logits = rt.prefill(tokens)
    assert rt._active is rt._single is not None
    np.testing.assert_allclose(busy_logits, idle_logits, rtol=1e-4, atol=1e-4)
    branches = rt.start_branches(state, 2, 3)
    assert rt.decode(state, branches, [7, 8]).shape[0] == 2
    assert rt.describe()["threads_when_busy"] == 1
    c.wall += 1.0  # idle again: back to the fast session
    rt.prefill(tokens)
    assert rt._active is rt.session


def _bench_latency(model_dir, capsys, keystrokes: int, *flags: str):
    """Run `bench latency --json` on the tiny model (2 candidates, 3 tokens, 1 cold request):
    the parser, for more calls, and the result."""
    from codecomplete.bench import latency

    parser = argparse.ArgumentParser()
    latency.add_arguments(parser)
    args = parser.parse_args(["--model", str(model_dir), "--keystrokes", str(keystrokes), "--cold", "1", "--n", "2",
                              "--max-tokens", "3", *flags, "--json"])
    assert latency.run(args) == 0
    return latency, parser, json.loads(capsys.readouterr().out)


def test_bench_latency_compares_thread_policies_under_background_load(tiny_model_dir, capsys):
    latency, parser, result = _bench_latency(tiny_model_dir, capsys, 4, "--threads", "adaptive,nospin,single",
                                             "--busy", "1")
    assert list(result["threads"]) == ["adaptive", "nospin", "single"] and result["busy_processes"] == 1
    # every policy answered the same keystrokes; shared decode rows never exceed one per candidate
    assert {r["requests"] for r in result["threads"].values()} == {4}
    rows = result["engine"]["warm_decode_rows_ratio"]
    assert 0 <= result["engine"]["warm_unchanged_prompt"] <= result["engine"]["warm_requests"]
    assert result["file"].endswith("typing_sample.py")  # the frozen default, not the live engine.py
    assert rows is None or 0 < rows <= 1
    assert result["threads"]["single"]["model"]["threads"] == 1
    assert result["threads"]["nospin"]["model"]["spin"] is False
    with pytest.raises(SystemExit):
        latency.run(parser.parse_args(["--threads", "fastest"]))


@pytest.mark.parametrize("flag, values, key", [("--precision", "int8,int8-w7", "precision"),
                                               ("--back-off", "needed,fixed", "back_off"),
                                               ("--reuse", "on,off", "reuse"),
                                               ("--patience", "4,2", "patience")])
def test_bench_latency_compares_variants_side_by_side(tiny_model_dir, capsys, flag, values, key):
    latency, parser, result = _bench_latency(tiny_model_dir, capsys, 3, flag, values)
    assert list(result[key]) == values.split(",") and "threads" not in result
    assert {r["requests"] for r in result[key].values()} == {3}
    if key == "precision":
        assert [r["model"]["linear"] for r in result[key].values()] == ["int8", "int8-w7"]
    if key == "reuse":  # without reuse every warm keystroke runs its prefill
        assert result[key]["off"]["warm_unchanged_prompt"] == result[key]["off"]["warm_continued_branch"] == 0
    with pytest.raises(SystemExit):
        latency.run(parser.parse_args([flag, "int3"]))
    with pytest.raises(SystemExit):  # the server replay would run its own settings, not these
        latency.run(parser.parse_args([flag, values, "--lsp"]))


def test_bench_latency_compares_model_folders_side_by_side(tiny_model_dir, tiny_gqa_model_dir, capsys):
    """--model A,B: one engine per folder, the same keystrokes to each in turn (how the
    grouped-query default was measured against the multi-head one)."""
    both = f"{tiny_model_dir},{tiny_gqa_model_dir}"
    latency, parser, result = _bench_latency(tiny_model_dir, capsys, 3, "--model", both)
    assert list(result["models"]) == [str(tiny_model_dir), str(tiny_gqa_model_dir)]
    first, second = result["models"].values()
    assert first["warm_p50_ratio"] == 1.0 and {first["requests"], second["requests"]} == {3}
    assert result["model"] == first["model"] and first["model"]["linear"] != second["model"]["linear"]  # int8, float
    with pytest.raises(SystemExit):
        latency.run(parser.parse_args(["--model", both, "--lsp"]))


def test_variant_names_name_the_varied_dimensions():
    from codecomplete.bench import latency

    names = latency.variant_names(["adaptive", "single"], ["int8", "int8-w7"], ["model"], ["on"], ["4"])
    assert names["single/int8-w7"] == ("single", "int8-w7", "model", "on", "4") and len(names) == 4
    assert latency.variant_names(["adaptive"], ["auto"], ["needed", "fixed"], ["on"], ["4"]) == {
        "needed": ("adaptive", "auto", "needed", "on", "4"), "fixed": ("adaptive", "auto", "fixed", "on", "4")}


def test_bench_latency_repeats_the_same_replay_and_pools_it(tiny_model_dir, capsys):
    latency, parser, result = _bench_latency(tiny_model_dir, capsys, 4, "--repeat", "3", "--reuse", "on,off")
    engine = result["engine"]
    assert engine["requests"] == 12 and engine["cold_requests"] == 3 and len(engine["runs"]) == 3
    assert [sum(k["run"] == r for k in engine["keystrokes"]) for r in range(3)] == [4, 4, 4]
    assert all(r["warm_p50_ms"] > 0 or r["warm_p50_ms"] != r["warm_p50_ms"] for r in engine["runs"])  # NaN: no warm
    assert result["reuse"]["off"]["requests"] == 12
    with pytest.raises(SystemExit):
        latency.run(parser.parse_args(["--repeat", "0"]))
