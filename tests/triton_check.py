"""What the Triton kernel tests share: they run on CUDA when there is one, else through
Triton's interpreter (TRITON_INTERPRET=1, in a subprocess: the flag is read when kernels are
defined), and are skipped where Triton is not installed (the laptop install and CI)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def run_check(code: str, timeout: float = 900) -> str:
    """Run `code` in a fresh interpreter (CUDA, or Triton's interpreter on CPU); its stdout.
    Fails the test with the end of its stderr when it exits non-zero."""
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    env = dict(os.environ)
    if not cuda:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout
