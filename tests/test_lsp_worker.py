"""lsp/worker.py: what the event loop reads of the worker is consistent while the worker thread writes it.

The loop calls Worker.load (marking it loading) while the worker thread installs what an earlier
load produced. The interleavings are made deterministic: the worker thread is paused just before
its n-th attribute write after the engine factory returned, for every n, and the loop reads the
status and queues a newer load right there.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from codecomplete.lsp.worker import Worker

KEY_FIRST = ("first-model", "onnx", "cpu")
KEY_SECOND = ("second-model", "onnx", "cpu")
WAIT_S = 5.0


class KeyedEngine:
    """An engine that knows the (model, runtime, device) it was made from."""

    def __init__(self, key: tuple):
        self.key = key

    def describe(self) -> str:
        return f"engine for {self.key[0]}"


class Gate:
    """Where the worker thread stops: before its pause_at-th write after the first factory call returned."""

    def __init__(self, pause_at: int):
        self.pause_at = pause_at
        self.writes = 0
        self.first_returned = threading.Event()
        self.paused = threading.Event()
        self.resume = threading.Event()


class PausingWorker(Worker):
    """A Worker whose thread pauses at one chosen attribute write (see Gate)."""

    def __init__(self, factory, loop, gate: Gate):
        object.__setattr__(self, "gate", gate)
        super().__init__(factory, loop)

    def __setattr__(self, name, value):
        gate = self.gate
        if threading.current_thread().name == "codecomplete-worker" and gate.first_returned.is_set():
            gate.writes += 1
            if gate.writes == gate.pause_at:
                gate.paused.set()
                gate.resume.wait(WAIT_S)
        object.__setattr__(self, name, value)


class Factory:
    """The first load returns at once (or raises); the second blocks until release is set."""

    def __init__(self, gate: Gate, first_fails: bool):
        self.gate = gate
        self.first_fails = first_fails
        self.second_started = threading.Event()
        self.release = threading.Event()

    def __call__(self, model, runtime, device):
        key = (model, runtime, device)
        if key == KEY_FIRST:
            self.gate.first_returned.set()  # the worker's writes from here on can be paused
            if self.first_fails:
                raise RuntimeError("first model is broken")
            return KeyedEngine(key)
        self.second_started.set()
        self.release.wait(WAIT_S)
        return KeyedEngine(key)


def assert_consistent(status) -> None:
    if status.state == "ready":
        assert status.engine is not None, f"ready without an engine: {status}"
    if status.engine is not None:
        assert status.engine.key == status.engine_key, f"engine and key disagree: {status}"


async def interleave(pause_at: int, first_fails: bool) -> bool:
    """One interleaving; False when the worker made fewer than pause_at writes (nothing left to try)."""
    loop = asyncio.get_running_loop()
    gate = Gate(pause_at)
    factory = Factory(gate, first_fails)
    worker = PausingWorker(factory, loop, gate)
    try:
        first = worker.load(*KEY_FIRST)
        while not gate.paused.is_set() and not first.done():
            await asyncio.sleep(0.001)
        if not gate.paused.is_set():
            return False
        assert_consistent(worker.status())  # read on the loop while the worker is mid-update
        # Where writes happen under a lock, load() waits for it; the timer lets the worker go on.
        threading.Timer(0.05, gate.resume.set).start()
        second = worker.load(*KEY_SECOND)
        await asyncio.wait_for(first, WAIT_S)
        assert await asyncio.to_thread(factory.second_started.wait, WAIT_S)
        during = worker.status()
        assert_consistent(during)
        assert during.state == "loading", f"a load is queued, yet the state is {during.state!r}"
        factory.release.set()
        result = await asyncio.wait_for(second, WAIT_S)
        after = worker.status()
        assert result.ok and not result.superseded
        assert after.ready and after.engine_key == KEY_SECOND and after.engine.key == KEY_SECOND
        return True
    finally:
        gate.resume.set()
        factory.release.set()
        worker.stop()


@pytest.mark.parametrize("first_fails", [False, True], ids=["first-loads", "first-fails"])
def test_loop_reads_a_consistent_status_at_every_point_of_a_finishing_load(first_fails):
    async def every_interleaving() -> int:
        pause_at = 1
        while await interleave(pause_at, first_fails):
            pause_at += 1
        return pause_at - 1

    assert asyncio.run(every_interleaving()) >= 1


def test_many_loads_in_a_row_end_ready_with_the_last_key():
    """Loads queued while the worker finishes earlier ones: the last one asked for is what stays."""
    loads = 200

    async def hammer():
        worker = Worker(lambda m, r, d: KeyedEngine((m, r, d)), asyncio.get_running_loop())
        try:
            pending = []
            for i in range(loads):
                key = (f"model-{i}", "onnx", "cpu")
                pending.append(worker.load(*key))
                status = worker.status()
                assert_consistent(status)
                if status.state != "loading":  # only the load just queued may have finished since
                    assert status.ready and status.engine_key == key, f"after load {i}: {status}"
                await asyncio.sleep(0)
            results = await asyncio.wait_for(asyncio.gather(*pending), WAIT_S * 4)
            return worker.status(), results
        finally:
            worker.stop()

    status, results = asyncio.run(hammer())
    assert status.ready and status.engine_key == (f"model-{loads - 1}", "onnx", "cpu")
    assert_consistent(status)
    assert results[-1].ok and not results[-1].superseded
