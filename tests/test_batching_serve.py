"""The team server's replica hands concurrent requests to the batch scheduler (no Ray
cluster started: the replica class is called directly)."""

from __future__ import annotations

import argparse
import asyncio
import time

import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("torch")

from codecomplete.request import CompletionOptions, CompletionRequest  # noqa: E402
from codecomplete.serve import app  # noqa: E402
from codecomplete.serve.cli import add_arguments, replica_batching  # noqa: E402


def _serve_args(*argv: str):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_gpu_replicas_batch_by_default_and_cpu_replicas_do_not():
    assert replica_batching(_serve_args("--device", "cuda")) == "on"
    assert replica_batching(_serve_args()) == "off"
    assert replica_batching(_serve_args("--device", "cuda", "--batching", "off")) == "off"
    assert replica_batching(_serve_args("--batching", "on")) == "on"
    engine_args = app.build_app(device="cuda", runtime="torch", batching="on")._bound_deployment.init_args[0]
    assert engine_args[-1] == "on"  # the ingress builds its EngineReplica with them


class _Context:
    class replica_id:  # noqa: N801 (the shape of Ray's replica context)
        unique_id = "replica-under-test"


def _replica(monkeypatch, model_dir, batching: str):
    monkeypatch.setattr(app.serve, "get_replica_context", lambda: _Context)
    return app.EngineReplica(str(model_dir), "torch", "cpu", "auto", 1, batching)


def _requests(k: int) -> list[CompletionRequest]:
    text = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
    return [CompletionRequest(text=text, offset=20 + 9 * i, language="python", path=f"user{i}.py",
                              options=CompletionOptions(n=2, max_new_tokens=12, multiline=True,
                                                        deadline_ms=60_000)) for i in range(k)]


async def _all(replica, requests):
    return await asyncio.gather(*(replica.complete(r) for r in requests))


@pytest.mark.parametrize("batching", ["on", "off"])
def test_the_replica_runs_requests_together_only_with_batching(monkeypatch, tiny_model_dir, batching):
    replica = _replica(monkeypatch, tiny_model_dir, batching)
    engine = replica.engine
    try:
        if batching == "on":  # each decode step waits a little, so that the requests overlap
            real = engine.runtime.decode_many

            def slow(steps):
                time.sleep(0.005)
                return real(steps)

            engine.runtime.decode_many = slow
        answers = asyncio.run(_all(replica, _requests(4)))
        assert [replica_id for _, replica_id in answers] == ["replica-under-test"] * 4
        assert all(c.tokens_generated > 0 for c, _ in answers)
        assert replica.describe()["model"]["batching"] == batching
        if batching == "on":
            assert max(len(r.rows) for r in engine.scheduler.stats.decode_records()) >= 2
        else:
            assert engine.scheduler is None and replica._worker._max_workers == 1
    finally:
        engine.close()
