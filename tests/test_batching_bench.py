"""`codecomplete bench serve --device cpu`: the in-process typists benchmark on a tiny
model, every variant the runtime offers, rows with step figures and traffic floors."""

from __future__ import annotations

import argparse
import inspect
import json

import pytest

torch = pytest.importorskip("torch")

from codecomplete.bench import serve as bench_serve  # noqa: E402
from codecomplete.runtime.torch import TorchRuntime  # noqa: E402

# batched-plain needs the runtime's batch_attention option (the runtime side of #20)
VARIANTS = ["sequential", "batched-bifurcated", "batched-eager-prefill"] + (
    ["batched-plain"] if "batch_attention" in inspect.signature(TorchRuntime.__init__).parameters else [])


def _args(*argv: str):
    p = argparse.ArgumentParser()
    bench_serve.add_arguments(p)
    return p.parse_args(list(argv))


def test_bench_serve_in_process_reports_each_variant_and_its_step_figures(tiny_model_dir, tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = bench_serve.run(_args(
            "--device", "cpu", "--model", str(tiny_model_dir), "--users", "1,3", "--variants", ",".join(VARIANTS),
            "--keystrokes", "4", "--interval-ms", "10", "--pause-ms", "10", "--n", "2", "--new-tokens", "5",
            "--context-tokens", "160", "--copy-gbps", "10", "--max-row-s", "5", "--cold-every-s", "0.03",
            "--cold-tokens", "300", "--keep-records", "--json", "--plot", str(tmp_path / "serve.png")))
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    assert [(r["variant"], r["users"], bool(r["cold_every_s"])) for r in rows] == [
        (v, u, cold) for v in VARIANTS for u in (1, 3) for cold in (False, True)]
    for r in rows:
        assert r["errors"] == 0 and r["keystrokes"] >= 1
        assert r["rows_per_step"] >= 1 and 0 < r["floor_ms"] < r["step_ms"]
        assert r["keystroke_floor_ms"] == pytest.approx(5 * r["floor_ms"])
        assert r["replay_ms"] == 0.0  # replays are timed on CUDA only (this runtime has no graphs)
        assert 0 < r["decode_cpu_ms"] and r["host_off_cpu_ms_per_iteration"] >= 0
        bands = r["steps_by_rows"]  # every step in one band of rows, the bands in order
        assert sum(b["steps"] for b in bands) == r["steps"] and bands[0]["decode_ms"] > 0
        assert all(b["fused_share"] == 0 and b["unfused_decode_ms"] == b["decode_ms"] for b in bands)  # CPU: none fused
        assert r["gc_pauses"]["count"] >= r["gc_pauses"]["full"] >= 0
        slowest = r["slowest_iterations"]  # the longest first, each placed in the row
        assert [i["iteration_ms"] for i in slowest["iterations"]] == sorted(
            (i["iteration_ms"] for i in slowest["iterations"]), reverse=True)
        assert slowest["iterations"][0]["at_s"] >= 0 and len(slowest["gaps"]) <= 5
        if r["variant"] != "sequential":  # the scheduler's loops pick after each step, and when they join
            assert r["picks_ms_per_iteration"] > 0 and r["first_picks_ms_per_iteration"] > 0
        kept = r["keystroke_records"]  # --keep-records: each keystroke's, without its texts
        assert len(kept) == r["keystrokes"] and "stages_ms" in kept[0] and "texts" not in kept[0]
        stages = r["stages"]  # each keystroke's engine stages; the slowest 5% at least as slow in total
        assert stages["total"]["slowest_mean_ms"] >= stages["total"]["rest_mean_ms"] > 0
        assert stages["generate"]["p50_ms"] > 0 and stages["generate"]["p95_ms"] <= stages["total"]["p95_ms"]
        assert [b["rows"] for b in bands] == sorted((b["rows"] for b in bands), key=lambda x: int(x.split("-")[0].rstrip("+")))
    batched = next(r for r in rows if r["variant"] == "batched-bifurcated" and r["users"] == 3 and not r["cold_every_s"])
    assert "keystrokes_per_s_vs_sequential" in batched and "step_vs_one_typist" in batched
    # the plain baseline reads each context once per row: a higher floor than bifurcated's
    assert batched["floor_speedup_vs_plain"] > 1 and batched["step_speedup_vs_plain"] > 0
    assert any(r.get("cold_prompts") for r in rows) and "step_p95_vs_no_cold" in rows[1]
    cold = next(r for r in rows if r["variant"] == "batched-bifurcated" and r["users"] == 3 and r["cold_every_s"])
    assert "step_p95_vs_eager_prefill" in cold and cold["fused_prefill_tokens_per_iteration"] == 0  # CPU: none fused
    assert (tmp_path / "serve.png").stat().st_size > 0


def test_bench_serve_refuses_an_unknown_variant():
    with pytest.raises(SystemExit, match="--variants"):
        bench_serve.run(_args("--device", "cpu", "--variants", "sequential,turbo"))


def test_the_sequential_variants_recorder_sees_steps_through_either_call():
    """One typist's steps go through decode, or decode_many_top where the runtime reduces
    rows on its device: the recorder records both and puts the runtime's methods back."""
    from codecomplete.bench.serve_gpu import StepRecorder
    from codecomplete.runtime.base import BranchState, ContextState, DecodeStep

    class Runtime:
        def decode(self, context, branches, next_tokens):
            return "whole"

        def decode_many_top(self, steps, full, banned, k, tail):
            return ["top"] * len(steps)

    rt = Runtime()
    context, branches = ContextState([1, 2, 3]), BranchState(n=2, max_new_tokens=4)
    with StepRecorder(rt) as recorder:
        assert rt.decode(context, branches, [0, 0]) == "whole"
        assert rt.decode_many_top(iter([DecodeStep(context, branches, [0, 0])]), [False], None, 64, 20.0) == ["top"]
    assert [(r.rows, r.contexts) for r in recorder.records] == [((2,), (3,)), ((2,), (3,))]
    assert all(r.decode_ms >= 0 and r.decode_cpu_ms >= 0 for r in recorder.records)
    assert "decode" not in vars(rt) and "decode_many_top" not in vars(rt)


def test_bench_serve_repeats_each_row_and_spreads_its_figures(tiny_model_dir, capsys):
    """--repeat N runs each row N times on the same engine; each row compares with its own
    repeat's one-typist row, and `repeats` gives each figure's median and range."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = bench_serve.run(_args(
            "--device", "cpu", "--model", str(tiny_model_dir), "--users", "1,2", "--variants", "batched-bifurcated",
            "--keystrokes", "2", "--interval-ms", "10", "--pause-ms", "10", "--n", "2", "--new-tokens", "3",
            "--context-tokens", "120", "--copy-gbps", "10", "--max-row-s", "3", "--repeat", "2",
            "--rerank-workers", "1", "--json"))
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert [(r["users"], r["repeat"]) for r in result["rows"]] == [(1, 0), (2, 0), (1, 1), (2, 1)]
    for r in result["rows"]:  # the rerank worker's own time, per row (a lone request reranks in place)
        assert r["rerank_in_place"] == 0 and r["rerank_pooled"] >= 0
        assert r["rerank_pooled"] == 0 or 0 < r["rerank_worker_p50_ms"] <= r["rerank_worker_p95_ms"]
    assert any(r["rerank_pooled"] for r in result["rows"] if r["users"] == 2)  # two typists overlap
    for r in result["rows"][1::2]:
        one = next(o for o in result["rows"] if o["users"] == 1 and o["repeat"] == r["repeat"])
        assert r["p95_vs_one_typist"] == pytest.approx(r["p95_ms"] / one["p95_ms"])
    spread = {(e["variant"], e["users"]): e for e in result["repeats"]}
    assert set(spread) == {("batched-bifurcated", 1), ("batched-bifurcated", 2)}
    p95 = spread[("batched-bifurcated", 2)]["p95_ms"]
    assert spread[("batched-bifurcated", 2)]["repeats"] == 2 and p95["min"] <= p95["median"] <= p95["max"]
    with pytest.raises(SystemExit):
        bench_serve.run(_args("--device", "cpu", "--model", str(tiny_model_dir), "--repeat", "0"))
