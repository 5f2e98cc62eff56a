"""End-to-end protocol tests: pytest-lsp drives the real server process over stdio.

The engine is codecomplete.lsp.testing's fake (known candidates, tunable speed), so these
pin the protocol: ranges, encodings, scheduling, cancellation, settings and robustness.
tests/test_lsp_engine.py runs the same server with the real engine and a tiny model.
LSP specification warnings are errors here.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time

import pytest
import pytest_lsp
from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pytest_lsp import ClientServerConfig, LanguageClient
from pytest_lsp.client import make_test_lsp_client

from codecomplete.lsp.raw_client import make_raw_client, send_raw_request
from codecomplete.lsp.testing import write_raw

pytestmark = [pytest.mark.asyncio(loop_scope="module"),
              pytest.mark.filterwarnings("error::pytest_lsp.checks.LspSpecificationWarning")]

FAKE = ["--engine-factory", "codecomplete.lsp.testing:fake_engine"]
SERVER = [sys.executable, "-m", "codecomplete.lsp", *FAKE]
ENV = {**os.environ, "CODECOMPLETE_FAKE_STEP_MS": "1", "CODECOMPLETE_PARENT_POLL_S": "0.2"}
PY = "file:///project/main.py"
CAPS = types.ClientCapabilities(
    window=types.WindowClientCapabilities(work_done_progress=True),
    workspace=types.WorkspaceClientCapabilities(configuration=True),
    text_document=types.TextDocumentClientCapabilities(
        completion=types.CompletionClientCapabilities(completion_item=types.ClientCompletionItemOptions(
            documentation_format=[types.MarkupKind.Markdown, types.MarkupKind.PlainText])),
        inline_completion=types.InlineCompletionClientCapabilities()),
)


# -- helpers --------------------------------------------------------------------------------
def track_status(client: LanguageClient) -> list:
    statuses: list = []
    client.feature("codecomplete/status")(lambda ls, params: statuses.append(params))
    client.statuses = statuses
    return statuses


async def wait_for_state(client: LanguageClient, state: str, after: int = 0, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for params in client.statuses[after:]:
            if params.state == state:
                return params
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {state!r} status within {timeout_s}s: {client.statuses}")


async def start(args=(), env=None, caps=CAPS, init_options=None, process_id=None) -> LanguageClient:
    client = make_test_lsp_client()
    track_status(client)
    await client.start_io(*SERVER, *args, env=env or ENV)
    await client.initialize_session(types.InitializeParams(
        capabilities=caps, initialization_options=init_options, process_id=process_id))
    return client


def open_doc(client: LanguageClient, text: str, uri: str = PY, language: str = "python") -> None:
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        text_document=types.TextDocumentItem(uri=uri, language_id=language, version=1, text=text)))


def edit(client: LanguageClient, version: int, line: int, col: int, text: str, uri: str = PY,
         end: tuple[int, int] | None = None) -> None:
    start_pos = types.Position(line=line, character=col)
    end_pos = types.Position(line=end[0], character=end[1]) if end else start_pos
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=[types.TextDocumentContentChangePartial(range=types.Range(start=start_pos, end=end_pos), text=text)]))


def inline_params(line: int, col: int, uri: str = PY) -> types.InlineCompletionParams:
    return types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line=line, character=col),
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic))


async def inline(client: LanguageClient, line: int, col: int, uri: str = PY) -> list[types.InlineCompletionItem]:
    result = await client.text_document_inline_completion_async(inline_params(line, col, uri))
    return list(result.items if isinstance(result, types.InlineCompletionList) else result or [])


async def complete(client: LanguageClient, line: int, col: int, uri: str = PY) -> types.CompletionList:
    return await client.text_document_completion_async(types.CompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line=line, character=col)))


def configure(client: LanguageClient, **settings) -> None:
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"codecomplete": settings}))


def rng(a: tuple[int, int], b: tuple[int, int]) -> types.Range:
    return types.Range(start=types.Position(line=a[0], character=a[1]), end=types.Position(line=b[0], character=b[1]))


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER, server_env=ENV, client_factory=make_raw_client),
                    scope="module")
async def client(lsp_client: LanguageClient):
    """One server for the module (starting Python + pygls takes seconds on a busy machine).

    Tests that change settings put them back; slow-engine tests switch to a model folder
    whose fake_step_ms file slows the fake engine down, and back.
    """
    track_status(lsp_client)
    lsp_client.init_result = await lsp_client.initialize_session(types.InitializeParams(capabilities=CAPS))
    await wait_for_state(lsp_client, "ready")
    yield
    await lsp_client.shutdown_session()


async def use_model(client: LanguageClient, path) -> None:
    """Switch the shared server's model folder ("" = its default) and wait until it is loaded."""
    n = len(client.statuses)
    configure(client, model=str(path))
    await wait_for_state(client, "ready", after=n)


def slow_model(tmp_path, step_ms: int):
    (tmp_path / "fake_step_ms").write_text(str(step_ms))
    return tmp_path


# -- capabilities ---------------------------------------------------------------------------------
async def test_initialize_advertises_inline_and_plain_completion_incremental_sync_utf16(client: LanguageClient):
    caps = client.init_result.capabilities
    assert caps.inline_completion_provider is not None
    assert caps.completion_provider is not None
    assert caps.text_document_sync.change == types.TextDocumentSyncKind.Incremental
    assert caps.position_encoding == types.PositionEncodingKind.Utf16


async def test_model_loading_reports_progress_and_status(client: LanguageClient):
    kinds = [r.kind for reports in client.progress_reports.values() for r in reports]
    assert kinds[:2] == ["begin", "end"]
    assert client.statuses[0].state == "loading"
    open_doc(client, "def show(value):\n    pri\n")
    await inline(client, 1, 7)
    await asyncio.sleep(0.1)
    assert client.statuses[-1].state == "ready" and client.statuses[-1].latencyMs >= 0


async def test_utf8_init_options_and_stray_prints_in_a_fresh_server():
    """UTF-8 is chosen when offered; initializationOptions apply; prints never reach stdout."""
    caps = types.ClientCapabilities(general=types.GeneralClientCapabilities(
        position_encodings=[types.PositionEncodingKind.Utf16, types.PositionEncodingKind.Utf8]))
    client = make_test_lsp_client()
    track_status(client)
    await client.start_io(*SERVER, env={**ENV, "CODECOMPLETE_FAKE_PRINT": "1"})
    result = await client.initialize_session(types.InitializeParams(capabilities=caps, initialization_options={
        "codecomplete": {"candidates": 2, "enable": {"*": False, "python": True}}}))
    try:
        assert result.capabilities.position_encoding == types.PositionEncodingKind.Utf8
        await wait_for_state(client, "ready")
        # "é" is 2 UTF-8 bytes, "😀" 4: 'é = "😀"; pri' puts the cursor at byte 16.
        open_doc(client, 'é = "😀"; pri\n')
        result = await complete(client, 0, 16)
        assert [i.text_edit.new_text for i in result.items] == ["print(value)", "printf(value)"]
        assert result.items[0].text_edit.range == rng((0, 13), (0, 16))
        items = await inline(client, 0, 16)
        assert len(items) == 2 and items[0].range == rng((0, 16), (0, 16))
        open_doc(client, "pri", uri="file:///project/notes.txt", language="plaintext")
        assert await inline(client, 0, 3, uri="file:///project/notes.txt") == []
        assert client.error is None
    finally:
        await client.shutdown_session()


async def test_prompts_name_files_relative_to_their_workspace_folder():
    """The file header in the prompt is `folder/path` inside a workspace folder and the bare
    name outside, never this machine's absolute directories."""
    client = make_test_lsp_client()
    track_status(client)
    await client.start_io(*SERVER, env={**ENV, "CODECOMPLETE_FAKE_ECHO": "paths"})
    await client.initialize_session(types.InitializeParams(
        capabilities=CAPS, root_uri="file:///home/ann/work",
        workspace_folders=[types.WorkspaceFolder(uri="file:///home/ann/work/shop", name="shop"),
                           types.WorkspaceFolder(uri="file:///home/ann/work/shop/vendor/lib", name="lib")]))
    try:
        await wait_for_state(client, "ready")
        open_doc(client, "x = 1\n", uri="file:///tmp/scratch.py")
        open_doc(client, "import lib\n", uri="file:///home/ann/work/shop/vendor/lib/core.py")
        open_doc(client, "def total(items):\n    ret\n", uri="file:///home/ann/work/shop/src/cart.py")
        items = await inline(client, 1, 7, uri="file:///home/ann/work/shop/src/cart.py")
        assert [i.insert_text for i in items] == ["shop/src/cart.py", "lib/core.py", "scratch.py"]
        client.workspace_did_change_workspace_folders(types.DidChangeWorkspaceFoldersParams(
            event=types.WorkspaceFoldersChangeEvent(added=[types.WorkspaceFolder(uri="file:///tmp", name="tmp")],
                                                    removed=[])))
        items = await inline(client, 1, 7, uri="file:///home/ann/work/shop/src/cart.py")
        assert [i.insert_text for i in items] == ["shop/src/cart.py", "lib/core.py", "tmp/scratch.py"]
    finally:
        await client.shutdown_session()


# -- completion ---------------------------------------------------------------------------------------
async def test_inline_completion_mid_token_inserts_the_rest_at_the_cursor(client: LanguageClient):
    open_doc(client, "def show(value):\n    pri\n")
    items = await inline(client, 1, 7)
    assert [i.insert_text for i in items][:2] == ["nt(value)", "ntf(value)"]
    assert all(i.range == rng((1, 7), (1, 7)) for i in items)


async def test_inline_completion_at_line_start_offers_whole_statements(client: LanguageClient):
    open_doc(client, "def show(value):\n    \n")
    items = await inline(client, 1, 4)
    assert items and items[0].insert_text == "print(value)"
    assert items[0].range == rng((1, 4), (1, 4))


async def test_completion_mid_token_edit_replaces_the_partial_word(client: LanguageClient):
    open_doc(client, "def show(value):\n    pri\n")
    result = await complete(client, 1, 7)
    assert result.is_incomplete
    first = result.items[0]
    assert first.text_edit.range == rng((1, 4), (1, 7))
    assert first.text_edit.new_text == "print(value)" == first.filter_text == first.label
    assert [i.sort_text for i in result.items] == sorted(i.sort_text for i in result.items)
    # Neovim 0.7's omnifunc keeps items whose word starts with the typed partial word.
    assert all(i.text_edit.new_text.startswith("pri") for i in result.items)


async def test_completion_at_line_start_uses_an_empty_range_and_first_lines(client: LanguageClient):
    open_doc(client, "def show(value):\n    \n")
    result = await complete(client, 1, 4)
    assert result.items and all(i.text_edit.range == rng((1, 4), (1, 4)) for i in result.items)
    multi = [i for i in result.items if i.label == "if value:"]
    assert multi and multi[0].text_edit.new_text == "if value:"
    assert "return value" in multi[0].documentation.value


async def test_incremental_edits_are_tracked(client: LanguageClient):
    open_doc(client, "def show(value):\n    \n")
    edit(client, 2, 1, 4, "p")
    edit(client, 3, 1, 5, "ri")
    items = await inline(client, 1, 7)
    assert items[0].insert_text == "nt(value)"
    edit(client, 4, 1, 4, "", end=(1, 7))  # delete "pri" again
    items = await inline(client, 1, 4)
    assert items[0].insert_text == "print(value)"


async def test_utf16_positions_after_emoji(client: LanguageClient):
    # "😀" is 2 UTF-16 code units: the cursor after 's = "😀😀"; pri' is at character 15.
    open_doc(client, 's = "😀😀"; pri\n')
    items = await inline(client, 0, 15)
    assert items[0].insert_text == "nt(value)" and items[0].range == rng((0, 15), (0, 15))
    result = await complete(client, 0, 15)
    assert result.items[0].text_edit.range == rng((0, 12), (0, 15))
    edit(client, 2, 0, 15, "nt")  # typed after the emoji, in UTF-16 columns
    result = await complete(client, 0, 17)
    assert result.items[0].text_edit.new_text == "print(value)"
    assert result.items[0].text_edit.range == rng((0, 12), (0, 17))
    items = await inline(client, 0, 17)
    assert items[0].insert_text == "(value)" and items[0].range == rng((0, 17), (0, 17))


# -- scheduling -------------------------------------------------------------------------------------------
async def test_cancel_request_stops_a_running_completion(client: LanguageClient, tmp_path):
    await use_model(client, slow_model(tmp_path, 50))
    configure(client, maxTokens=60, deadlineMs=20000)  # a 3 s job
    try:
        open_doc(client, "def show(value):\n    pri\n")
        running = client.protocol.send_request(types.TEXT_DOCUMENT_INLINE_COMPLETION, inline_params(1, 7), msg_id="slow-1")
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id="slow-1"))
        with pytest.raises(JsonRpcException) as excinfo:
            await asyncio.wrap_future(running)
        assert excinfo.value.code == types.LSPErrorCodes.RequestCancelled
        assert time.monotonic() - t0 < 1.0
        # The worker is free again at once: the decode loop stopped at its next step.
        configure(client, maxTokens=2)
        t0 = time.monotonic()
        assert await inline(client, 1, 7)
        assert time.monotonic() - t0 < 1.0
    finally:
        configure(client, maxTokens=48, deadlineMs=1000)
        await use_model(client, "")


async def test_burst_of_requests_only_the_last_gets_work(client: LanguageClient, tmp_path):
    await use_model(client, slow_model(tmp_path, 20))
    configure(client, maxTokens=10, deadlineMs=5000)  # 200 ms per job
    try:
        open_doc(client, "def show(value):\n    \n")
        requests = []
        for i, ch in enumerate("pri"):  # typing, as an editor sends it: didChange, then a request
            edit(client, i + 2, 1, 4 + i, ch)
            requests.append(asyncio.ensure_future(inline(client, 1, 5 + i)))
            await asyncio.sleep(0.05)
        n_status = len(client.statuses)
        results = await asyncio.gather(*requests)
        assert results[0] == [] and results[1] == []
        assert results[2] and results[2][0].insert_text == "nt(value)"
        await asyncio.sleep(0.1)
        answered = [st for st in client.statuses[n_status:] if getattr(st, "latencyMs", None) is not None]
        assert len(answered) == 1
    finally:
        configure(client, maxTokens=48, deadlineMs=1000)
        await use_model(client, "")


async def test_deadline_bounds_the_answer(client: LanguageClient, tmp_path):
    await use_model(client, slow_model(tmp_path, 30))
    configure(client, maxTokens=200, deadlineMs=300)  # a 6 s job with a 0.3 s deadline
    try:
        open_doc(client, "def show(value):\n    pri\n")
        t0 = time.monotonic()
        items = await inline(client, 1, 7)
        assert time.monotonic() - t0 < 0.6
        assert items  # the fake engine, like the real one, stops at the deadline with what it has
    finally:
        configure(client, maxTokens=48, deadlineMs=1000)
        await use_model(client, "")


# -- settings ------------------------------------------------------------------------------------------------
async def test_configuration_change_applies_and_bad_values_keep_the_old_ones(client: LanguageClient):
    open_doc(client, "def show(value):\n    pri\n")
    assert len(await inline(client, 1, 7)) == 3
    n_messages = len(client.messages)
    try:
        configure(client, candidates=1)
        assert len(await inline(client, 1, 7)) == 1
        configure(client, candidates=99, runtime="tpu")
        await asyncio.sleep(0.2)
        warnings = [m.message for m in client.messages[n_messages:] if m.type == types.MessageType.Warning]
        assert any("candidates" in m and "keeping 1" in m for m in warnings)
        assert any("runtime" in m and "tpu" in m for m in warnings)
        assert len(await inline(client, 1, 7)) == 1
        configure(client, enable={"python": False, "*": True})
        assert await inline(client, 1, 7) == []
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
            settings={"enable": {"python": True}, "candidates": 2}))  # the keys at the top level work too
        assert len(await inline(client, 1, 7)) == 2
    finally:
        configure(client, candidates=4, enable={"*": True})


async def test_model_change_reloads_the_engine_in_the_worker(client: LanguageClient, tmp_path):
    n = len(client.statuses)
    configure(client, model=str(tmp_path))
    await wait_for_state(client, "loading", after=n)
    ready = await wait_for_state(client, "ready", after=n)
    assert str(tmp_path) in ready.message
    open_doc(client, "def show(value):\n    pri\n")
    assert await inline(client, 1, 7)
    n_messages = len(client.messages)
    configure(client, model=str(tmp_path / "missing"))  # rejected: the loaded model stays
    await asyncio.sleep(0.2)
    assert "no such model folder" in client.messages[-1].message and len(client.messages) == n_messages + 1
    assert await inline(client, 1, 7)
    await use_model(client, "")


async def test_broken_model_path_is_shown_once_answers_are_empty_and_exit_is_clean(tmp_path):
    client = make_raw_client()
    track_status(client)
    await client.start_io(*SERVER, "--model", str(tmp_path / "missing"), env=ENV)
    client._stderr_forwarder.cancel()  # this test reads the server's stderr itself
    await client.initialize_session(types.InitializeParams(capabilities=CAPS))
    await wait_for_state(client, "error")
    open_doc(client, "def show(value):\n    pri\n")
    assert await inline(client, 1, 7) == []
    assert list((await complete(client, 1, 7)).items) == []
    assert await inline(client, 1, 7) == []
    errors = [m.message for m in client.messages if m.type == types.MessageType.Error]
    assert len(errors) == 1 and "missing" in errors[0]
    await client.shutdown_async(None)
    with pytest.raises(JsonRpcException) as excinfo:  # requests after shutdown: InvalidRequest
        await send_raw_request(client, {"jsonrpc": "2.0", "id": 904, "method": "textDocument/completion",
                                        "params": {"textDocument": {"uri": PY}, "position": {"line": 0, "character": 0}}})
    assert excinfo.value.code == -32600
    client.exit(None)
    await asyncio.wait_for(client._server.wait(), timeout=20)
    stderr = (await client._server.stderr.read()).decode()
    await client.stop()
    assert "could not load" in stderr and "missing" in stderr
    assert client._server.returncode == 0


async def test_check_flag_exits_nonzero_with_a_clear_message_for_a_broken_model(tmp_path):
    bad = await asyncio.to_thread(subprocess.run, [*SERVER, "--check", "--model", str(tmp_path / "missing")],
                                  capture_output=True, text=True, env=ENV, timeout=60)
    assert bad.returncode == 1 and "could not load" in bad.stderr and "missing" in bad.stderr


# -- robustness --------------------------------------------------------------------------------------------------
async def test_out_of_range_positions_get_a_clear_error_and_the_server_lives(client: LanguageClient):
    n_messages = len(client.messages)
    open_doc(client, "def show(value):\n    pri\n")
    with pytest.raises(JsonRpcException) as excinfo:
        await inline(client, 40, 0)
    assert excinfo.value.code == -32602 and "past the end" in excinfo.value.message
    with pytest.raises(JsonRpcException) as excinfo:
        await send_raw_request(client, {"jsonrpc": "2.0", "id": 901, "method": "textDocument/completion",
                                        "params": {"textDocument": {"uri": PY}, "position": {"line": -1, "character": 0}}})
    assert excinfo.value.code == -32602
    # A character past the end of its line means the end of the line (LSP rule).
    items = await inline(client, 1, 500)
    assert items and items[0].range == rng((1, 7), (1, 7))
    assert len(client.messages) == n_messages  # errors are answers, not popups


async def test_protocol_garbage_is_answered_or_logged_never_shown(client: LanguageClient):
    n_messages = len(client.messages)
    with pytest.raises(JsonRpcException) as excinfo:
        await send_raw_request(client, {"jsonrpc": "2.0", "id": 902, "method": "codecomplete/noSuchMethod", "params": {}})
    assert excinfo.value.code == -32601
    with pytest.raises(JsonRpcException) as excinfo:
        await send_raw_request(client, {"jsonrpc": "2.0", "id": 903, "method": "textDocument/inlineCompletion",
                                        "params": {"textDocument": {}, "position": "here"}})
    assert excinfo.value.code == -32602 and "invalid params" in excinfo.value.message
    write_raw(client, b"{this is not json")
    write_raw(client, b'{"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": 7}}')
    write_raw(client, b"[1, 2, 3]")
    # A document whose bytes are not UTF-8: replaced, not dropped.
    write_raw(client, b'{"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": '
                      b'{"uri": "file:///project/latin1.py", "languageId": "python", "version": 1, "text": "x = \'\xe9\'\\npri"}}}')
    items = await inline(client, 1, 3, uri="file:///project/latin1.py")
    assert items and items[0].insert_text == "nt(value)"
    assert len(client.messages) == n_messages  # nothing popped up at the user


async def test_unknown_documents_binary_and_huge_documents_get_empty_lists(client: LanguageClient):
    assert await inline(client, 0, 0, uri="file:///project/never-opened.py") == []
    assert list((await complete(client, 0, 0, uri="file:///project/never-opened.py")).items) == []
    open_doc(client, "pri\x00\x01\x02", uri="file:///project/blob.bin", language="binary")
    assert await inline(client, 0, 3, uri="file:///project/blob.bin") == []
    open_doc(client, "x = 1\n" * 700_000 + "pri", uri="file:///project/huge.py")
    assert await inline(client, 700_000, 3, uri="file:///project/huge.py") == []
    open_doc(client, "pri", uri="file:///project/unknown.xyz", language="no-such-language")
    assert await inline(client, 0, 3, uri="file:///project/unknown.xyz")
    open_doc(client, "def show(value):\n    pri\n")
    assert await inline(client, 1, 7)  # still serving


async def test_server_exits_when_the_editor_process_dies():
    editor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    client = await start(process_id=editor.pid)
    editor.wait()
    try:
        await asyncio.wait_for(client._server.wait(), timeout=10)
    finally:
        if client._server.returncode is None:
            client._server.kill()
        await client.stop()
    assert client._server.returncode == 0


async def test_tcp_mode_listens_on_localhost_and_serves():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = await asyncio.create_subprocess_exec(*SERVER, "--tcp", str(port), env=ENV)
    client = make_test_lsp_client()
    track_status(client)
    try:
        for _ in range(300):  # the server needs a few seconds to import and listen
            try:
                await client.start_tcp("127.0.0.1", port)
                break
            except OSError:
                await asyncio.sleep(0.05)
        await client.initialize_session(types.InitializeParams(capabilities=CAPS))
        await wait_for_state(client, "ready")
        open_doc(client, "def show(value):\n    pri\n")
        assert (await inline(client, 1, 7))[0].insert_text == "nt(value)"
        await client.shutdown_async(None)
        client.exit(None)
        assert await asyncio.wait_for(server.wait(), timeout=20) == 0
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()
        await asyncio.wait_for(client.stop(), timeout=10)


async def test_random_garbage_never_kills_the_server_or_reaches_the_user(client: LanguageClient):
    rnd = random.Random(int(os.environ.get("CODECOMPLETE_FUZZ_SEED", "7")))
    n_messages = len(client.messages)
    shapes = [
        lambda: rnd.randbytes(rnd.randint(1, 200)),
        lambda: json.dumps({"jsonrpc": rnd.choice(["2.0", "1.0", None]), "id": rnd.choice([None, [1], {"a": 1}, "x"]),
                            "method": rnd.choice(["textDocument/completion", "textDocument/didChange", "$/cancelRequest",
                                                  "initialize", 5]),
                            "params": rnd.choice([None, [], 3, "p", {"textDocument": {"uri": 1}}])}).encode(),
        lambda: json.dumps({"jsonrpc": "2.0", "method": "textDocument/didChange", "params": {
            "textDocument": {"uri": PY, "version": 9}, "contentChanges": [{
                "range": {"start": {"line": rnd.randint(0, 99), "character": rnd.randint(0, 99)},
                          "end": {"line": rnd.randint(0, 99), "character": rnd.randint(0, 99)}},
                "text": rnd.choice(["", "x", "\ud800", "😀\r\n"])}]}}).encode(),
    ]
    open_doc(client, "def show(value):\n    pri\n")
    for _ in range(int(os.environ.get("CODECOMPLETE_FUZZ_COUNT", "60"))):
        write_raw(client, rnd.choice(shapes)())
    open_doc(client, "def show(value):\n    pri\n")
    assert (await inline(client, 1, 7))[0].insert_text == "nt(value)"
    assert len(client.messages) == n_messages
