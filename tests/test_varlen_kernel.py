"""The varlen bifurcated kernel against a float64 reference, and the CUDA batched step's
code (VarlenDecoder, padded as the graphs pad) against the per-request loop. On CUDA when
there is one, else through Triton's interpreter (tests/triton_check.py); skipped where Triton is
not installed (CI)."""

from __future__ import annotations

import json

import pytest
from triton_check import needs_triton, run_check

pytestmark = needs_triton
_run = run_check


def test_varlen_kernel_matches_a_float64_reference_with_poisoned_caches_and_padding():
    out = _run("""
        import torch
        from codecomplete.bench.decode import check_varlen_kernel
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        for dtype in (["fp32", "bf16"] if dev == "cuda" else ["fp32"]):
            print(check_varlen_kernel(dev, dtype, seed=1))
    """)
    assert "cases" in out


def test_varlen_decode_step_equals_the_per_request_loop():
    # seed 0's mixes split steps into several replays of one bucket: each group's rows must
    # be its own, not the bucket's buffer that the next replay overwrites
    out = _run("""
        import torch
        from codecomplete.bench.decode import check_varlen_decoder
        for seed in (0, 2):
            print(check_varlen_decoder("cuda" if torch.cuda.is_available() else "cpu", seed=seed))
    """)
    assert "bifurcated" in out and "plain" in out


def test_bench_varlen_sweeps_launch_shapes_that_all_agree():
    out = _run("""
        import json, subprocess, sys, torch
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        args = [sys.executable, "-m", "codecomplete", "bench", "varlen", "--device", dev, "--cases", "2x2@70,1x3@20",
                "--kv-heads", "2", "--heads-per-kv", "2", "--head-dim", "16", "--quick", "--json"]
        print(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
    """)
    result = json.loads(out)
    assert [r["case"] for r in result["rows"]] == ["2x2@70", "1x3@20"]
    for r in result["rows"]:
        assert len(r["top"]) == 2 and all(t["max_abs_diff"] < 1e-4 for t in r["top"])
        assert r["slots"] == 4 and r["default_n_splits"] >= 1  # rows padded to a power of two


def test_bench_varlen_refuses_a_bad_case():
    from codecomplete.bench.varlen import parse_cases

    assert parse_cases("13x3@1400, 1x4@8000") == [(13, 3, 1400), (1, 4, 8000)]
    with pytest.raises(SystemExit, match="REQUESTSxROWS@CONTEXT"):
        parse_cases("13x3")
