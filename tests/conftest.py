"""Shared fixtures: tiny random-weight model folders built on the fly (no downloads)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

# The checkout's codecomplete/ folder is not the package: setuptools' package-dir puts lsp/
# and models/ inside it at install time. `python -m pytest` (and any `python -m`/`-c` child
# started from the repository root) puts the root first on sys.path, where codecomplete/
# would shadow the installed package and lack codecomplete.lsp and codecomplete.models.
# So the tests import what is installed (editable or not), and so do the processes they start.
_CHECKOUT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _CHECKOUT]
os.environ["PYTHONSAFEPATH"] = "1"  # children: no script or working folder on sys.path
# (a child's PYTHONPATH must not hold an empty entry either: that one is the working folder)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Tests run offline: any outgoing connection that is not to this machine fails."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or
                                      self.family == socket.AF_UNIX):
            return real_connect(self, address)
        raise OSError(f"network access blocked in tests: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny multi-head model folder with int8 weights (SPM order)."""
    from codecomplete.models.testing import make_test_model

    path = tmp_path_factory.mktemp("tiny-model")
    make_test_model(path)
    return path


@pytest.fixture(scope="session")
def tiny_gqa_model_dir(tmp_path_factory):
    """A tiny grouped-query model folder with q/k/v biases, float weights, PSM order."""
    from codecomplete.models.testing import make_test_model

    path = tmp_path_factory.mktemp("tiny-gqa-model")
    make_test_model(path, n_kv_heads=2, qkv_bias=True, int8=False, fim_order="psm", seed=1)
    return path


@pytest.fixture(scope="session")
def serve_port():
    """One local Ray with Ray Serve for the whole run (starting it takes a good part of the
    serve tests' time): its HTTP port. Modules deploy their applications on it under their
    own route prefix and delete them when done; two CPUs, so they fit on a 2-core CI box."""
    pytest.importorskip("ray.serve")
    from ray import serve

    from codecomplete.serve.common import SERVE_LOGGING, start_ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import ray

    if ray.is_initialized():  # something reached Ray before (some of its calls start one on first use)
        ray.shutdown()
    start_ray(num_cpus=2, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=SERVE_LOGGING)
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
