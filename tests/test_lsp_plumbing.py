"""The server's small parts outside the handlers: command line, process guards, capabilities, jobs."""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import subprocess
import sys
import time

import pytest
from lsprotocol import types

from codecomplete.lsp.capabilities import ClientSupport
from codecomplete.lsp.client_log import ClientLogHandler
from codecomplete.lsp.documents import UTF16, Document
from codecomplete.lsp.jobs import LatestJobs
from codecomplete.lsp.main import NVIM_RUNTIME, check, main, parse_tcp
from codecomplete.lsp.process import exit_when_gone, process_alive
from codecomplete.lsp.server import (
    HANDLERS,
    create_server,
    settings_after_failed_load,
    status_params,
)
from codecomplete.lsp.settings import Settings
from codecomplete.lsp.worker import Job
from codecomplete.request import CancelToken, CompletionRequest


# -- command line -------------------------------------------------------------------------------
def test_tcp_address_defaults_to_localhost_and_rejects_words():
    assert parse_tcp("2087") == ("127.0.0.1", 2087)
    assert parse_tcp("0.0.0.0:9000") == ("0.0.0.0", 9000)
    with pytest.raises(argparse.ArgumentTypeError, match="HOST:PORT"):
        parse_tcp("localhost:http")


def test_nvim_runtime_flag_prints_the_folder_that_holds_the_lua_module(capsys):
    assert main(["--nvim-runtime"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(NVIM_RUNTIME)
    assert (NVIM_RUNTIME / "lua" / "codecomplete" / "init.lua").is_file()


def test_check_reports_a_failing_factory_with_exit_code_1(capsys):
    def broken(model, runtime, device):
        raise RuntimeError("weights are truncated")

    assert check(broken, "some/model", Settings()) == 1
    assert "could not load some/model: weights are truncated" in capsys.readouterr().err
    assert check(lambda m, r, d: object(), None, Settings()) == 0
    assert "loaded the default model" in capsys.readouterr().err


# -- the editor's process -----------------------------------------------------------------------
def test_process_alive_sees_itself_and_not_a_finished_or_zombie_child():
    assert process_alive(os.getpid())
    reaped = subprocess.Popen([sys.executable, "-c", "pass"])
    reaped.wait()
    assert not process_alive(reaped.pid)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while process_alive(zombie.pid) and time.monotonic() < deadline:  # exited, not yet waited for
            time.sleep(0.01)
        assert not process_alive(zombie.pid)
    finally:
        zombie.wait()


def test_exit_when_gone_exits_with_0_once_the_parent_is_gone():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    codes: list[int] = []
    asyncio.run(asyncio.wait_for(exit_when_gone(gone.pid, codes.append, poll_s=0.01), timeout=5))
    assert codes == [0]


# -- what the handlers call ---------------------------------------------------------------------
def test_client_support_reads_progress_configuration_and_markdown():
    assert ClientSupport.from_capabilities(types.ClientCapabilities()) == ClientSupport()
    caps = types.ClientCapabilities(
        window=types.WindowClientCapabilities(work_done_progress=True),
        workspace=types.WorkspaceClientCapabilities(configuration=True),
        text_document=types.TextDocumentClientCapabilities(completion=types.CompletionClientCapabilities(
            completion_item=types.ClientCompletionItemOptions(documentation_format=[types.MarkupKind.Markdown]))))
    assert ClientSupport.from_capabilities(caps) == ClientSupport(progress=True, configuration=True, markdown=True)


def test_failed_load_falls_back_to_the_loaded_engine_and_names_the_default_model_empty():
    wanted = Settings(model="broken", runtime="torch", device="cuda")
    assert settings_after_failed_load(wanted, None, "shipped") == wanted  # nothing loaded: keep what was asked
    back = settings_after_failed_load(wanted, ("shipped", "onnx", "cpu"), "shipped")
    assert (back.model, back.runtime, back.device) == ("", "onnx", "cpu")
    other = settings_after_failed_load(wanted, ("elsewhere", "onnx", "cpu"), "shipped")
    assert other.model == "elsewhere"
    assert settings_after_failed_load(wanted, (None, "onnx", "cpu"), None).model == ""


def test_status_params_round_the_latency_and_leave_out_what_is_unknown():
    assert status_params("loading") == {"state": "loading"}
    assert status_params("ready", latency_ms=12.345, source="warm") == {"state": "ready", "latencyMs": 12.3,
                                                                         "source": "warm"}


def test_a_newer_job_supersedes_the_older_and_release_keeps_the_newer():
    async def run():
        loop = asyncio.get_running_loop()
        jobs = LatestJobs()

        def job() -> Job:
            return Job(CompletionRequest(text="x", offset=1, cancel=CancelToken()), loop.create_future(), 100.0)

        old, new = job(), job()
        jobs.track("a", old)
        jobs.supersede("a")
        jobs.track("a", new)
        assert old.future.done() and old.future.result() is None and old.request.cancel.cancelled
        jobs.release("a", old)  # the old request's answer arrives late: the new job stays tracked
        assert len(jobs) == 1 and not new.future.done()
        jobs.supersede("a")  # the document closed
        assert new.request.cancel.cancelled and len(jobs) == 0
        jobs.supersede("never-opened")

    asyncio.run(run())


def test_document_snapshot_keeps_its_text_when_the_document_changes():
    doc = Document("file:///a.py", "python", 1, "a\nb")
    assert doc.line_count == 2
    snap = doc.snapshot()
    doc.apply_change(types.TextDocumentContentChangeWholeDocument(text="x\ny\nz"), UTF16)
    assert (snap.text, snap.line_count) == ("a\nb", 2)
    assert doc.line_count == 3


def test_create_server_registers_every_declared_handler():
    ls = create_server(lambda m, r, d: object())
    methods = {method for method, _, _ in HANDLERS}
    assert {types.INITIALIZE, types.TEXT_DOCUMENT_INLINE_COMPLETION, types.TEXT_DOCUMENT_DID_CLOSE} <= methods
    assert methods <= set(ls.protocol.fm.features)


def test_client_log_handler_forwards_records_from_any_thread_with_their_level():
    ls = create_server(lambda m, r, d: object())
    sent: list[types.LogMessageParams] = []
    ls.window_log_message = sent.append
    handler = ClientLogHandler(ls)
    record = logging.LogRecord("codecomplete.lsp", logging.WARNING, __file__, 1, "slow %s", ("load",), None)
    handler.emit(record)  # before the worker starts there is no loop: dropped, no error
    assert sent == []

    async def run():
        ls.loop = asyncio.get_running_loop()
        ls.protocol.set_writer(io.BytesIO())
        await asyncio.to_thread(handler.emit, record)
        await asyncio.sleep(0.01)

    asyncio.run(run())
    assert [(p.type, p.message) for p in sent] == [(types.MessageType.Warning, "slow load")]
