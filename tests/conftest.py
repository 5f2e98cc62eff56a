"""Shared fixtures: tiny random-weight model folders built on the fly (no downloads)."""

from __future__ import annotations

import socket

import pytest


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
