"""`codecomplete bench runtime`: one subprocess per runtime, JSON rows with ratios."""

from __future__ import annotations

import argparse
import json

from codecomplete.bench import runtime as bench_runtime


def _args(model_dir, runtimes: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_runtime.add_arguments(parser)
    return parser.parse_args(["--json", "--model", str(model_dir), "--runtimes", runtimes,
                              "--prefill-tokens", "32,4096", "--decode-context", "64", "--decode-n", "1,2",
                              "--decode-steps", "2", "--repeat", "1", "--decode-repeat", "1", "--threads", "1"])


def test_bench_runtime_prints_rows_for_each_stage(tiny_model_dir, capsys):
    assert bench_runtime.run(_args(tiny_model_dir, "onnx-int8,onnx-fp32")) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    assert {r["runtime"] for r in rows} == {"onnx-int8", "onnx-fp32"}
    prefill = sorted(r["tokens"] for r in rows if r["stage"] == "prefill" and r["runtime"] == "onnx-int8")
    assert prefill == [32, 512]  # 4096 is capped at the model context
    decode = [r for r in rows if r["stage"] == "decode" and r["runtime"] == "onnx-int8"]
    assert sorted(r["n"] for r in decode) == [1, 2] and all(r["ms"] > 0 and r["rss_mb"] > 0 for r in decode)
    assert result["model"]["origin"] == "given" and result["notes"] == []


def test_bench_runtime_rejects_unknown_runtimes(tiny_model_dir):
    assert bench_runtime.run(_args(tiny_model_dir, "onnx-int4")) == 2


def test_bench_attention_on_cpu_checks_agreement_and_reports_ratios_and_floors(capsys):
    from codecomplete.bench import attention as bench_attention

    parser = argparse.ArgumentParser()
    bench_attention.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--context", "64", "--n", "1,2", "--repeat", "1", "--json"])
    assert bench_attention.run(args) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["n"], r["context"]) for r in rows] == [(1, 64), (2, 64)]
    for r in rows:  # outputs agreed with plain before timing; no Triton rows on CPU
        assert r["bifurcated_rel_err"] < 1e-4 and "bifurcated_triton_ms" not in r
        assert r["speedup"] == r["plain_ms"] / r["best_bifurcated_ms"] and r["floor_plain_ms"] > 0
    assert rows[0]["bifurcated_vs_n1"] == 1.0


def test_bench_runtime_scores_agreement_against_the_first_runtime(tiny_model_dir, capsys):
    parser = argparse.ArgumentParser()
    bench_runtime.add_arguments(parser)
    args = parser.parse_args(["--json", "--model", str(tiny_model_dir), "--runtimes", "onnx-fp32,onnx-int8,onnx-int8-w7",
                              "--prefill-tokens", "32", "--decode-context", "64", "--decode-n", "1",
                              "--decode-steps", "2", "--repeat", "1", "--decode-repeat", "1", "--threads", "1",
                              "--agreement", "40"])
    assert bench_runtime.run(args) == 0
    scores = json.loads(capsys.readouterr().out)["agreement"]
    assert scores["reference"] == "onnx-fp32" and set(scores) == {"reference", "onnx-int8", "onnx-int8-w7"}
    for name in ("onnx-int8", "onnx-int8-w7"):
        assert scores[name]["positions"] == 40 and 0.5 <= scores[name]["top1"] <= 1 and scores[name]["kl"] >= 0


def test_agreement_of_identical_and_of_shuffled_logits():
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((50, 30)).astype(np.float32)
    assert bench_runtime.agreement(a, a) == {"top1": 1.0, "kl": 0.0, "positions": 50}
    other = bench_runtime.agreement(a, a[::-1])
    assert other["top1"] < 0.5 and other["kl"] > 0.1
