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
