"""The engine in a child process: a native crash is one logged error, an empty answer, a
restarted engine and a status, in the language server (pytest-lsp) and in the CLI.

The engine is codecomplete.lsp.testing's faulty fake: a document holding
CODECOMPLETE_FAULT:<SIGNAL> makes its process die of that signal mid-request.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from lsprotocol import types
from test_lsp_server import CAPS, ENV, inline, open_doc, track_status, wait_for_state

from codecomplete import isolation
from codecomplete.isolation import (
    EngineCrashed,
    EngineLoadFailed,
    ProcessEngine,
    exit_cause,
)
from codecomplete.lsp.process import process_alive
from codecomplete.lsp.testing import faulty_engine
from codecomplete.request import CancelToken, CompletionOptions, CompletionRequest
from codecomplete.wire import outgoing_request_json

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the child gets inherited file descriptors (POSIX)")

FAULTY = ["--engine-factory", "codecomplete.lsp.testing:faulty_engine"]
SERVER = [sys.executable, "-m", "codecomplete.lsp", *FAULTY]
DOC = "def show(value):\n    pri\n"


def request(text: str = DOC, offset: int | None = None, **options) -> CompletionRequest:
    return CompletionRequest(text=text, offset=len("def show(value):\n    pri") if offset is None else offset,
                             language="python", path="main.py", options=CompletionOptions(**options),
                             cancel=CancelToken())


def crash_text(sig: str) -> str:
    return f"# CODECOMPLETE_FAULT:{sig}\n{DOC}"


def wait_until(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture
def engine():
    e = ProcessEngine(faulty_engine, (None, "onnx", "cpu"))
    yield e
    e.close()


# -- ProcessEngine ------------------------------------------------------------------------------------
def test_a_requests_absolute_deadline_shortens_the_budget_it_leaves_with():
    r = request(deadline_ms=1000)
    budget = lambda: outgoing_request_json(r)["options"]["deadline_ms"]  # noqa: E731
    assert 990.0 < budget() <= 1000.0
    r.deadline = time.monotonic() + 0.25
    assert 200.0 < budget() <= 250.0
    r.deadline = time.monotonic() - 1.0
    assert budget() == 1.0  # the wire's floor: the engine stops at once


def test_exit_cause_names_signals_and_exit_codes():
    assert exit_cause(-signal.SIGFPE) == "SIGFPE" and exit_cause(-signal.SIGSEGV) == "SIGSEGV"
    assert exit_cause(3) == "exit code 3" and exit_cause(None) == "no exit code"


def test_child_answers_like_the_engine_and_says_it_is_isolated(engine):
    completion = engine.complete(request())
    assert [c.text for c in completion.candidates][:2] == ["nt(value)", "ntf(value)"]
    assert engine.describe() == {"runtime": "fake", "step_ms": 1.0, "isolation": "process"}
    assert engine.pid != os.getpid()


@pytest.mark.parametrize("sig", ["SIGFPE", "SIGSEGV", "SIGKILL"])
def test_crash_mid_request_answers_none_logs_once_and_restarts(engine, sig, caplog):
    states = []
    engine.watch_status(lambda state, message: states.append((state, message)))
    first_pid = engine.pid
    with caplog.at_level("ERROR", logger="codecomplete.isolation"):
        assert engine.complete(request(crash_text(sig))) is None
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and sig in errors[0]
    assert states[0][0] == "restarting" and sig in states[0][1]
    wait_until(lambda: engine.state == "ready")
    assert states[-1][0] == "ready" and engine.pid != first_pid
    assert engine.complete(request()).candidates[0].text == "nt(value)"


def test_requests_while_restarting_are_answered_empty_at_once(engine, monkeypatch):
    monkeypatch.setattr(isolation, "RESTART_PAUSES_S", (1.0,))
    assert engine.complete(request(crash_text("SIGSEGV"))) is None
    t0 = time.monotonic()
    assert engine.state == "restarting" and engine.complete(request()) is None
    assert time.monotonic() - t0 < 0.1
    wait_until(lambda: engine.state == "ready")
    assert engine.complete(request()) is not None


def test_an_engine_that_keeps_crashing_stops_restarting_with_a_clear_state(engine, monkeypatch):
    monkeypatch.setattr(isolation, "RESTART_PAUSES_S", (0.0,))
    monkeypatch.setattr(isolation, "MAX_RESTARTS", 2)
    for _ in range(2):
        assert engine.complete(request(crash_text("SIGFPE"))) is None
        wait_until(lambda: engine.state == "ready")
    assert engine.complete(request(crash_text("SIGFPE"))) is None
    assert engine.state == "error" and "keeps crashing (SIGFPE, 3 times in a row)" in engine.message
    assert engine.complete(request()) is None


def test_an_answer_between_crashes_resets_the_count(engine, monkeypatch):
    monkeypatch.setattr(isolation, "RESTART_PAUSES_S", (0.0,))
    monkeypatch.setattr(isolation, "MAX_RESTARTS", 1)
    for _ in range(3):
        assert engine.complete(request(crash_text("SIGFPE"))) is None
        wait_until(lambda: engine.state == "ready")
        assert engine.complete(request()) is not None


def test_cancel_token_stops_the_childs_decode_at_the_next_step(tmp_path):
    (tmp_path / "fake_step_ms").write_text("50")
    slow = ProcessEngine(faulty_engine, (str(tmp_path), "onnx", "cpu"))
    try:
        r = request(max_new_tokens=60, deadline_ms=20_000)  # a 3 s job
        threading.Timer(0.3, r.cancel.cancel).start()
        t0 = time.monotonic()
        completion = slow.complete(r)
        assert completion.cancelled and time.monotonic() - t0 < 1.0
        assert slow.complete(request(max_new_tokens=2)).candidates  # the next request is not cancelled
    finally:
        slow.close()


def test_deadline_reaches_the_child(tmp_path):
    (tmp_path / "fake_step_ms").write_text("30")
    slow = ProcessEngine(faulty_engine, (str(tmp_path), "onnx", "cpu"))
    try:
        t0 = time.monotonic()
        assert slow.complete(request(max_new_tokens=200, deadline_ms=300)).candidates
        assert time.monotonic() - t0 < 0.6
    finally:
        slow.close()


def test_a_hung_child_is_killed_after_the_deadline_and_restarted(engine, monkeypatch):
    monkeypatch.setattr(isolation, "HUNG_GRACE_S", 0.3)
    t0 = time.monotonic()
    assert engine.complete(request(crash_text("SIGSTOP"), deadline_ms=200)) is None
    assert time.monotonic() - t0 < 2.0
    wait_until(lambda: engine.state == "ready")
    assert engine.complete(request()) is not None


def test_load_failures_and_load_crashes_are_told_apart(tmp_path):
    with pytest.raises(EngineLoadFailed, match="no such model folder"):
        ProcessEngine(faulty_engine, (str(tmp_path / "missing"), "onnx", "cpu"))
    (tmp_path / "fault_on_load").write_text("SIGSEGV")
    with pytest.raises(EngineCrashed, match=r"crashed \(SIGSEGV\) while loading"):
        ProcessEngine(faulty_engine, (str(tmp_path), "onnx", "cpu"))


def test_a_python_error_in_the_engine_keeps_the_child(engine):
    pid = engine.pid
    bad = request()
    bad.options.n = 0  # outside the wire's range: the child refuses it as a Python error
    assert engine.complete(bad) is None
    assert "options.n" in engine.last_error and engine.pid == pid and engine.state == "ready"


def test_factories_must_be_importable_by_name():
    with pytest.raises(TypeError, match="module-level"):
        ProcessEngine(lambda model, runtime, device: None, (None, "onnx", "cpu"))


def test_closing_stops_the_child(engine):
    pid = engine.pid
    engine.close()
    wait_until(lambda: not process_alive(pid), 5.0)


# -- many requests at once ------------------------------------------------------------------------------
WORDS = {"pri": "nt(value)", "ret": "urn value", "val": "ue = compute(total)", "if": " value:\n    return value"}


def typed(word: str, steps: int) -> CompletionRequest:
    """A request whose fake answer completes `word` after `steps` decode steps (tokens_generated)."""
    text = f"def show(value):\n    {word}\n"
    return request(text, offset=len(text) - 1, max_new_tokens=steps, deadline_ms=20_000)


@pytest.fixture
def concurrent(tmp_path):
    """A fake engine of 20 ms steps that runs four requests at once in its child."""
    (tmp_path / "fake_step_ms").write_text("20")
    e = ProcessEngine(faulty_engine, (str(tmp_path), "onnx", "cpu"), concurrency=4)
    yield e
    e.close()


def _at_once(engine, requests: dict) -> tuple[dict, dict]:
    """Each request of {name: request} completed in a thread of its own: the answers and the
    seconds each took, by name."""
    answers, took = {}, {}
    t0 = time.monotonic()

    def one(name):
        answers[name] = engine.complete(requests[name])
        took[name] = time.monotonic() - t0

    threads = [threading.Thread(target=one, args=(name,)) for name in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30.0)
    return answers, took


def test_concurrent_requests_each_get_their_own_answer_and_a_slow_one_holds_back_none(concurrent):
    requests = {"pri": typed("pri", 50), "ret": typed("ret", 15), "val": typed("val", 10), "if": typed("if", 5)}
    answers, took = _at_once(concurrent, requests)  # one after another: 1.6 s; at once: the slowest's 1 s
    for word, completion in answers.items():
        assert completion.candidates[0].text == WORDS[word]
        assert completion.tokens_generated == requests[word].options.max_new_tokens
    assert max(took["ret"], took["val"], took["if"]) < took["pri"] - 0.3
    assert took["if"] < took["val"] < took["ret"] and took["pri"] < 1.45


def test_requests_past_the_concurrency_wait_in_the_childs_queue(tmp_path):
    (tmp_path / "fake_step_ms").write_text("20")
    two = ProcessEngine(faulty_engine, (str(tmp_path), "onnx", "cpu"), concurrency=2)
    try:
        answers, took = _at_once(two, {word: typed(word, 15) for word in ("pri", "ret", "val")})
        assert all(answers[word].candidates[0].text == WORDS[word] for word in answers)
        assert sorted(took.values())[-1] > 0.55  # the third one started when one of the first two ended
    finally:
        two.close()


def test_cancelling_one_of_several_requests_ends_that_one_only(concurrent):
    requests = {word: typed(word, 30) for word in ("pri", "ret", "val")}  # 0.6 s each
    threading.Timer(0.15, requests["ret"].cancel.cancel).start()
    answers, took = _at_once(concurrent, requests)
    assert answers["ret"].cancelled and took["ret"] < 0.35
    for word in ("pri", "val"):
        assert not answers[word].cancelled and answers[word].tokens_generated == 30
        assert answers[word].candidates[0].text == WORDS[word]


def test_a_child_killed_with_requests_in_flight_answers_each_none_and_restarts(concurrent, caplog):
    first_pid = concurrent.pid
    threading.Timer(0.2, os.kill, (first_pid, signal.SIGKILL)).start()
    with caplog.at_level("ERROR", logger="codecomplete.isolation"):
        answers, took = _at_once(concurrent, {word: typed(word, 100) for word in WORDS})  # 2 s each
    assert answers == dict.fromkeys(WORDS) and max(took.values()) < 1.0
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "SIGKILL" in errors[0] and "completing 4 requests" in errors[0]
    wait_until(lambda: concurrent.state == "ready")
    assert concurrent.pid != first_pid
    assert concurrent.complete(typed("val", 2)).candidates[0].text == WORDS["val"]


# -- the language server --------------------------------------------------------------------------------
async def _start(args=()):
    from pytest_lsp.client import make_test_lsp_client

    client = make_test_lsp_client()
    track_status(client)
    await client.start_io(*SERVER, *args, env=ENV)
    await client.initialize_session(types.InitializeParams(capabilities=CAPS))
    await wait_for_state(client, "ready", timeout_s=60)
    return client


@pytest.mark.asyncio
async def test_lsp_runtime_killed_by_a_signal_answers_empty_logs_once_restarts_and_answers_the_next():
    client = await _start()
    try:
        open_doc(client, crash_text("SIGFPE"), uri="file:///project/crash.py")
        n_status = len(client.statuses)
        assert await inline(client, 2, 7, uri="file:///project/crash.py") == []
        restarting = await wait_for_state(client, "restarting", after=n_status)
        assert "SIGFPE" in restarting.message
        await wait_for_state(client, "ready", after=n_status, timeout_s=60)
        open_doc(client, DOC)
        items = await inline(client, 1, 7)
        assert items and items[0].insert_text == "nt(value)"
        await asyncio.sleep(0.2)
        crash_logs = [m.message for m in client.log_messages
                      if m.type == types.MessageType.Error and "SIGFPE" in m.message]
        assert len(crash_logs) == 1 and "crashed" in crash_logs[0]
        assert not [m for m in client.messages if m.type == types.MessageType.Error]  # no popup for one crash
        loaded = [m.message for m in client.log_messages if "loaded" in m.message]
        assert "'isolation': 'process'" in loaded[0]
    finally:
        await client.shutdown_session()


@pytest.mark.asyncio
async def test_lsp_in_process_flag_runs_the_engine_in_the_server():
    client = await _start(["--in-process"])
    try:
        open_doc(client, DOC)
        assert await inline(client, 1, 7)
        loaded = [m.message for m in client.log_messages if "loaded" in m.message]
        assert loaded and "isolation" not in loaded[0]
    finally:
        await client.shutdown_session()


# -- the CLI ------------------------------------------------------------------------------------------------
def _cli(tmp_path, text: str, *extra: str) -> subprocess.CompletedProcess:
    source = tmp_path / "main.py"
    source.write_text(text)
    line = text.count("\n") - 1
    return subprocess.run([sys.executable, "-m", "codecomplete", "complete", str(source), "--line", str(line),
                           "--character", "7", *FAULTY, *extra], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)


def test_cli_runtime_crash_is_a_clear_message_and_exit_code_not_a_core_dump(tmp_path):
    done = _cli(tmp_path, crash_text("SIGFPE"))
    assert done.returncode == 4, done.stderr[-2000:]
    assert "codecomplete: the model runtime crashed (SIGFPE)" in done.stderr
    assert "(no completion)" not in done.stdout and not list(tmp_path.glob("core*"))
    fine = _cli(tmp_path, DOC)
    assert fine.returncode == 0 and "nt(value)" in fine.stdout


def test_cli_crash_while_loading_is_reported_too(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "fault_on_load").write_text("SIGSEGV")
    done = _cli(tmp_path, DOC, "--model", str(model))
    assert done.returncode == 4 and "crashed (SIGSEGV) while loading" in done.stderr


# -- bench latency --isolation ---------------------------------------------------------------------------
def test_bench_latency_compares_the_engine_in_process_and_in_a_child_on_the_same_keystrokes(tiny_model_dir, capsys):
    from test_cpuload import _bench_latency

    latency, parser, result = _bench_latency(tiny_model_dir, capsys, 4, "--isolation", "inprocess,process")
    pair = result["isolation"]
    assert list(pair) == ["inprocess", "process"] and {r["requests"] for r in pair.values()} == {4}
    assert pair["process"]["model"]["isolation"] == "process" and "isolation" not in pair["inprocess"]["model"]
    # the same engine behind a pipe takes the same paths (cache, warm) on the same keystrokes
    assert pair["process"]["paired_keystrokes"] == 4 and pair["process"]["paired_delta_p50_ms"] is not None
    assert pair["process"]["warm_unchanged_prompt"] == pair["inprocess"]["warm_unchanged_prompt"]
    # settings reach the child: without reuse every warm keystroke runs its prefill there too
    _, _, off = _bench_latency(tiny_model_dir, capsys, 3, "--isolation", "process", "--reuse", "off")
    assert off["engine"]["warm_unchanged_prompt"] == off["engine"]["warm_continued_branch"] == 0
    assert off["model"]["isolation"] == "process"
    with pytest.raises(SystemExit):
        latency.run(parser.parse_args(["--isolation", "thread"]))
