"""The reranker's checks in worker processes (a batching replica's RerankPool): the same
reports as in place, the same answers from the engine, a killed worker replaced without a
request lost, the workers stopped by close()."""

from __future__ import annotations

import marshal
import os
import threading
import time

import pytest

from codecomplete.languages import language_for
from codecomplete.models.testing import SAMPLE_CODE
from codecomplete.request import CompletionOptions, CompletionRequest
from codecomplete.rerank import syntax_reports
from codecomplete.rerank_pool import RerankPool, default_rerank_workers

CASES = [  # (language, prefix, suffix, candidate texts): fine ones and broken ones
    ("python", "def area(r):\n    return 3.14 * r", "\n\nprint(area(2))\n",
     [" * r", " * (r", ")", " * r\n    if r < 0:"]),
    ("python", SAMPLE_CODE[:200], SAMPLE_CODE[200:], ["x", "(", "'abc", "pass"]),
    ("javascript", "function add(a, b) {\n  return a", "\n}\n", [" + b;", " + (b;", " +", "}"]),
    ("go", "package main\n\nfunc main() {\n\tx := ", "\n}\n", ["1", "[]int{1, 2", "f(", "\"s"]),
    ("rust", "fn main() {\n    let v = vec![1, 2", "\n}\n", ["];", ", 3];", "", ")"]),
]


@pytest.fixture(scope="module")
def pool():
    p = RerankPool(2)
    yield p
    p.close()


def test_pool_reports_equal_in_place(pool):
    pool.worker_ms.clear()
    for language, prefix, suffix, texts in CASES:
        lang = language_for(language)
        assert pool.reports(prefix, suffix, lang, texts) == syntax_reports(prefix, suffix, lang, texts)
        for typed in range(3):  # named documents: each worker reparses from the document's last window
            cut = max(0, len(prefix) - 3 + typed)
            want = syntax_reports(prefix[:cut], suffix, lang, texts)
            assert pool.reports(prefix[:cut], suffix, lang, texts, f"{language}.doc") == want
    assert pool.in_place == 0
    # the workers' own time, per request answered (what bench serve reports of the pool)
    assert len(pool.worker_ms) == 4 * len(CASES) and all(0.0 < ms < 5000.0 for ms in pool.worker_ms)
    assert pool.reports("x = ", "", language_for("python"), []) == []


def test_pool_serves_threads_at_once(pool):
    lang = language_for("python")
    expected = syntax_reports(SAMPLE_CODE[:300], SAMPLE_CODE[300:], lang, ["a", "(", "b)"])
    out: list = [None] * 8

    def one(i: int) -> None:
        out[i] = pool.reports(SAMPLE_CODE[:300], SAMPLE_CODE[300:], lang, ["a", "(", "b)"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(out))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == [expected] * len(out)


def test_killed_worker_is_replaced_and_the_request_answered():
    pool = RerankPool(1)
    try:
        lang = language_for("python")
        texts = [" * r", " * (r"]
        expected = syntax_reports("def f(r):\n    return r", "\n", lang, texts)
        for pid in pool.pids():
            os.kill(pid, 9)
        t0 = time.perf_counter()
        assert pool.reports("def f(r):\n    return r", "\n", lang, texts) == expected  # in place
        assert pool.in_place == 1
        # the replacement starts in the background: the request that found the worker dead
        # did not wait for a process to start, and those meanwhile are checked in place
        assert time.perf_counter() - t0 < 0.5
        deadline = time.monotonic() + 60
        while not pool.pids() and time.monotonic() < deadline:
            assert pool.reports("def f(r):\n    return r", "\n", lang, texts) == expected
            time.sleep(0.05)
        checked_in_place = pool.in_place
        assert len(pool.pids()) == 1
        assert pool.reports("def f(r):\n    return r", "\n", lang, texts) == expected  # the new worker
        assert pool.in_place == checked_in_place
    finally:
        pool.close()


def test_a_request_the_worker_fails_is_checked_in_place_and_the_worker_kept():
    """A worker that answers that a request failed is alive: it stays in the pool (no
    process restarted per such request), and the request is answered in place."""
    pool = RerankPool(1)
    try:
        lang = language_for("python")
        pid = pool.pids()[0]
        worker = pool._all[0]
        real = worker._to.send_bytes
        worker._to.send_bytes = lambda data: real(marshal.dumps(("no-such-language", (), [], None)))
        texts = ["1", "x)"]
        want = syntax_reports("x = ", "\n", lang, texts)
        assert pool.reports("x = ", "\n", lang, texts) == want
        assert pool.in_place == 1 and pool.pids() == [pid]
        worker._to.send_bytes = real
        assert pool.reports("x = ", "\n", lang, texts) == want
        assert pool.in_place == 1 and pool.pids() == [pid]
    finally:
        pool.close()


def test_close_stops_the_workers():
    pool = RerankPool(2)
    processes = [w.process for w in pool._all]
    assert len(processes) == 2 and all(p.poll() is None for p in processes)
    pool.close()
    assert all(p.poll() is not None for p in processes) and pool.pids() == []
    # after close a request is still answered, in place
    lang = language_for("python")
    assert pool.reports("x = ", "\n", lang, ["1"]) == syntax_reports("x = ", "\n", lang, ["1"])


def test_default_workers(monkeypatch):
    assert default_rerank_workers("off") == 0
    for cores, workers in ((2, 0), (4, 1), (16, 4), (128, 4)):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        assert default_rerank_workers("on") == workers
    with pytest.raises(ValueError):
        RerankPool(0)


def test_engine_answers_the_same_with_the_pool(tiny_model_dir):
    pytest.importorskip("torch")
    from codecomplete.engine import Engine
    from codecomplete.runtime import load_runtime

    rt = load_runtime(str(tiny_model_dir), runtime="torch")
    opts = CompletionOptions(n=4, max_new_tokens=8, deadline_ms=60_000, temperature=0.0)
    requests = [CompletionRequest(text=SAMPLE_CODE, offset=offset, language="python", path=f"f{offset}.py",
                                  options=opts) for offset in (80, 200, 330)]
    answers = {}
    for workers in (0, 2):
        engine = Engine(rt, batching="on", rerank_workers=workers)
        try:
            assert engine.describe()["rerank_workers"] == workers
            answers[workers] = [[(c.text, round(c.score, 6), c.syntax_ok, c.score_parts)
                                 for c in engine.complete(r).candidates] for r in requests]
            if workers:
                assert engine.rerank_pool.in_place == 0
        finally:
            engine.close()
    assert answers[2] == answers[0]
    assert any(answers[0])
    with pytest.raises(ValueError):
        Engine(rt, rerank_workers=-1)


def test_pool_starts_under_any_main_module(tmp_path):
    """The workers never re-run the parent's main module (a Ray worker's, a script read
    from stdin): a parent whose __main__ has no file still gets its answers from them."""
    import subprocess
    import sys

    script = ("from codecomplete.languages import language_for\n"
              "from codecomplete.rerank import syntax_reports\n"
              "from codecomplete.rerank_pool import RerankPool\n"
              "p = RerankPool(1)\n"
              "args = ('def f(x):\\n    return (x', '\\n', language_for('python'), [')', ' +'])\n"
              "r = p.reports(*args)\n"
              "assert p.in_place == 0, p.in_place\n"
              "assert r == syntax_reports(*args[:3], args[3])\n"
              "p.close()\n"
              "print([x.ok for x in r])\n")
    done = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[True, False]"  # the closing paren fits, a dangling + does not
