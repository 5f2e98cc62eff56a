"""Generation over several model processes: long evaluations on many-core machines.

`--workers K` starts K processes, each loading its own engine; cases go to whichever
process is free and the answers come back in case order. Each case is independent (the
sampling seed travels in its request), so results match a serial run with the same thread
count; another thread count changes float summation order and may flip a near-tie. On a GPU the
processes share the device: a small model's decode loop is bound by kernel launches,
so K processes keep it busy where one cannot.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

from codecomplete.eval.runner import Case, Generated, Progress
from codecomplete.request import Completion

_ENGINE = None  # the engine of this worker process


@dataclass(frozen=True)
class EngineSpec:
    """What a worker loads: the arguments of Engine.load."""

    model: str | None = None
    runtime: str = "onnx"
    device: str = "cpu"
    threads: int | None = None
    precision: str = "auto"

    def load(self):
        from codecomplete.engine import Engine

        return Engine.load(self.model, runtime=self.runtime, device=self.device, threads=self.threads,
                           precision=self.precision)


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """CPU threads each worker's kernels get: the cores shared out, at least one."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, workers))


def _init_worker(spec: EngineSpec) -> None:
    global _ENGINE
    _ENGINE = spec.load()


def _describe() -> dict:
    return _ENGINE.describe()


def _complete(index: int, case: Case) -> tuple[int, Generated]:
    _ENGINE.forget()  # as in a serial run: no state from the worker's earlier cases
    start = time.perf_counter()
    try:
        completion = _ENGINE.complete(case.request)
    except Exception as e:  # scored as a miss, like a serial run
        return index, Generated([], latency_ms=(time.perf_counter() - start) * 1000.0, error=f"{type(e).__name__}: {e}")
    return index, Generated(list(completion.candidates), completion.tokens_generated, completion.model_calls,
                            (time.perf_counter() - start) * 1000.0, dict(completion.timings_ms))


class ParallelEngine:
    """K engine processes behind the harness's engine interface (see runner.generate_all)."""

    def __init__(self, spec: EngineSpec, workers: int):
        if workers < 2:
            raise ValueError("a parallel engine needs at least 2 workers")
        self.spec, self.workers = spec, workers
        # spawn: a forked CUDA context or onnxruntime thread pool is not safe to reuse
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_init_worker, initargs=(spec,))
        self._description: dict | None = None

    def describe(self) -> dict:
        if self._description is None:
            self._description = {**self._pool.submit(_describe).result(), "workers": self.workers}
        return self._description

    def complete(self, request):
        """One request through a worker (the harness sends whole lists through complete_all)."""
        case = Case(task_id="", request=request, reference="", language=request.language)
        _, gen = self._pool.submit(_complete, 0, case).result()
        if gen.error:
            raise RuntimeError(gen.error)
        return Completion(gen.candidates, gen.timings_ms, tokens_generated=gen.tokens_generated,
                          model_calls=gen.model_calls)

    def complete_all(self, cases: Sequence[Case], progress: Progress) -> list[Generated]:
        out: list[Generated | None] = [None] * len(cases)
        futures = [self._pool.submit(_complete, i, case) for i, case in enumerate(cases)]
        reported = False
        for future in as_completed(futures):
            index, gen = future.result()
            if gen.error and not reported:
                print(f"engine error on {cases[index].task_id}: {gen.error}", file=sys.stderr)
                reported = True
            out[index] = gen
            progress.advance()
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
