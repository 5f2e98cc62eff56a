"""The team server's replica hands concurrent requests to the batch scheduler, in its own
process or in the engine's child process (no Ray cluster started: the replica class is
called directly)."""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("torch")

from codecomplete.isolation import ProcessEngine  # noqa: E402
from codecomplete.lsp.process import process_alive  # noqa: E402
from codecomplete.request import CompletionOptions, CompletionRequest  # noqa: E402
from codecomplete.serve import app  # noqa: E402
from codecomplete.serve.cli import add_arguments, build_from_settings, replica_batching  # noqa: E402
from codecomplete.serve.common import ApiError  # noqa: E402


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


def _replica(monkeypatch, model_dir, batching: str, engine_process: str | None = None):
    monkeypatch.setattr(app.serve, "get_replica_context", lambda: _Context)
    return app.EngineReplica(str(model_dir), "torch", "cpu", "auto", 1, batching, engine_process=engine_process)


def _requests(k: int) -> list[CompletionRequest]:
    text = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
    return [CompletionRequest(text=text, offset=20 + 9 * i, language="python", path=f"user{i}.py",
                              options=CompletionOptions(n=2, max_new_tokens=12, multiline=True,
                                                        deadline_ms=60_000)) for i in range(k)]


async def _all(replica, requests):
    return await asyncio.gather(*(replica.complete(r) for r in requests))


@pytest.mark.parametrize("batching", ["on", "off"])
def test_the_replica_runs_requests_together_only_with_batching(monkeypatch, tiny_model_dir, batching):
    replica = _replica(monkeypatch, tiny_model_dir, batching, engine_process="off")
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
        assert "isolation" not in replica.describe()["model"] and "engine_pid" not in replica.describe()
        if batching == "on":
            assert max(len(r.rows) for r in engine.scheduler.stats.decode_records()) >= 2
        else:
            assert engine.scheduler is None and replica._worker._max_workers == 1
    finally:
        engine.close()


def test_engine_process_is_on_with_batching_by_default_and_the_flag_reaches_the_replica():
    assert _serve_args().engine_process is None  # the replica's default: on with batching, off without
    cuda = ("--device", "cuda", "--runtime", "torch")
    assert build_from_settings(_serve_args(*cuda))[0]._bound_deployment.init_args[2] is None
    off = build_from_settings(_serve_args(*cuda, "--engine-process", "off"))[0]._bound_deployment
    assert off.init_args[2] == {"engine_process": "off"}
    assert app.build_app(engine_process="on")._bound_deployment.init_args[2] == {"engine_process": "on"}
    with pytest.raises(SystemExit):
        _serve_args("--engine-process", "maybe")


def test_a_batching_replica_runs_its_engine_in_a_child_that_answers_many_at_once(monkeypatch, tiny_model_dir):
    replica = _replica(monkeypatch, tiny_model_dir, "on")
    engine = replica.engine
    try:
        assert isinstance(engine, ProcessEngine) and engine.concurrency == app.REPLICA_ONGOING_REQUESTS
        answers = asyncio.run(_all(replica, _requests(4)))
        assert [replica_id for _, replica_id in answers] == ["replica-under-test"] * 4
        assert all(c.tokens_generated > 0 for c, _ in answers)
        described = replica.describe()
        assert described["model"]["isolation"] == "process" and described["model"]["batching"] == "on"
        assert described["engine_pid"] == engine.pid != os.getpid()
        refused = _requests(1)[0]
        refused.options.n = 0  # the child refuses it: no answer, as while a crashed engine restarts
        with pytest.raises(ApiError) as no_answer:
            asyncio.run(replica.complete(refused))
        assert no_answer.value.status == 503 and engine.state == "ready"
    finally:
        pid = engine.pid
        replica.close()
    deadline = time.monotonic() + 5.0
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not process_alive(pid)  # closing the replica (Ray Serve's shutdown) stops the engine's process
