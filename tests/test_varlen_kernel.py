"""The varlen bifurcated kernel against a float64 reference, and the CUDA batched step's
code (VarlenDecoder, padded as the graphs pad) against the per-request loop. On CUDA when
there is one, else through Triton's interpreter (TRITON_INTERPRET=1, in a subprocess: the
flag is read when kernels are defined); skipped where Triton is not installed (CI)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _run(code: str) -> str:
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


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
    out = _run("""
        import torch
        from codecomplete.bench.decode import check_varlen_decoder
        print(check_varlen_decoder("cuda" if torch.cuda.is_available() else "cpu", seed=2))
    """)
    assert "bifurcated" in out and "plain" in out
