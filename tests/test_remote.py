"""Remote mode: the language server's engine is the team service (settings server, apiKey).

A stand-in for the service runs in the test on 127.0.0.1 and answers the native endpoint's
shapes (POST /v1/engine/complete, GET /health, the documented errors), with a slow mode to
test cancellation (it notices the client closing the connection) and failure modes.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pytest_lsp.client import make_test_lsp_client
from test_lsp_server import (
    CAPS,
    ENV,
    SERVER,
    configure,
    edit,
    inline,
    inline_params,
    open_doc,
    track_status,
    wait_for_state,
)

from codecomplete import remote
from codecomplete.lsp.settings import Settings, apply_settings
from codecomplete.lsp.testing import fake_candidates
from codecomplete.remote import RemoteEngine
from codecomplete.request import (
    CancelToken,
    Candidate,
    Completion,
    CompletionOptions,
    CompletionRequest,
)
from codecomplete.wire import completion_to_json, request_from_json

API_KEY = "sk-test-0123456789"
DOC = "def show(value):\n    pri\n"


class StandIn:
    """The team service's native endpoint, in a thread. mode: ok | slow | 401 | 503 | 429 | 422."""

    def __init__(self):
        self.mode = "ok"
        self.slow_s = 3.0
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        self.session_headers: list[str | None] = []
        self.connections = 0
        self.open_sockets: list[socket.socket] = []
        self.cancelled = threading.Event()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def setup(self):
                super().setup()
                stand_in.connections += 1
                stand_in.open_sockets.append(self.connection)

            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: dict, headers: dict | None = None):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, kind: str, message: str):
                self._answer(status, {"error": {"message": message, "type": kind}})

            def do_GET(self):
                if self.path == "/health":
                    self._answer(503 if stand_in.mode == "503" else 200, {"status": stand_in.mode})
                else:
                    self._error(404, "not_found", "no such path")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.requests.append(body)
                stand_in.auth.append(self.headers.get("Authorization"))
                stand_in.session_headers.append(self.headers.get("X-Session-Id"))
                mode = stand_in.mode
                if mode == "401":
                    return self._error(401, "authentication_error", "invalid API key")
                if mode in ("503", "429", "422"):
                    return self._error(int(mode), "busy", f"mode {mode}")
                if mode == "slow" and self._client_closed_within(stand_in.slow_s):
                    stand_in.cancelled.set()  # closing the connection cancels the request
                    return
                request = request_from_json(body)
                texts = fake_candidates(request.prefix, request.options.n)
                completion = Completion([Candidate(t, score=1.0 - 0.1 * i) for i, t in enumerate(texts)],
                                        {"total": 1.0}, prefill_reused_tokens=3)
                self._answer(200, completion_to_json(completion),
                             {"X-Codecomplete-Replica": "replica-7", "X-Codecomplete-Warm": "true"})

            def _client_closed_within(self, seconds: float) -> bool:
                readable, _, _ = select.select([self.connection], [], [], seconds)
                return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        """Down: no listener, and the kept-alive connections cut."""
        self.httpd.shutdown()
        self.httpd.server_close()
        for sock in self.open_sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def stand_in():
    server = StandIn()
    yield server
    server.close()


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(remote, "RETRY_PAUSES_S", (0.3,))
    monkeypatch.setattr(remote, "LOADING_PAUSE_S", 0.3)


def free_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed


def request(path: str = "src/main.py", **options) -> CompletionRequest:
    return CompletionRequest(text=DOC, offset=len("def show(value):\n    pri"), language="python", path=path,
                             options=CompletionOptions(**options), cancel=CancelToken())


# -- RemoteEngine -------------------------------------------------------------------------------------
def test_sends_the_wire_request_with_session_and_key_and_reads_the_completion(stand_in):
    engine = RemoteEngine(stand_in.url, API_KEY)
    completion = engine.complete(request(n=2))
    assert [c.text for c in completion.candidates] == ["nt(value)", "ntf(value)"]
    assert completion.source == "warm" and engine.replica == "replica-7" and engine.warm is True
    sent = stand_in.requests[0]
    assert sent["text"] == DOC and sent["options"]["n"] == 2 and sent["path"] == "src/main.py"
    assert stand_in.auth == [f"Bearer {API_KEY}"]
    engine.complete(request())
    engine.complete(request("src/other.py"))
    sessions = [r["session"] for r in stand_in.requests]
    assert sessions[0] == sessions[1] != sessions[2]  # one document sticks to one session
    assert stand_in.session_headers == sessions  # the header Ray Serve's proxy routes by
    assert sessions[0] != RemoteEngine(stand_in.url, check_health=False).session_key("src/main.py")
    assert stand_in.connections == 1  # kept alive
    assert engine.describe()["server"] == stand_in.url


def test_no_key_no_authorization_header(stand_in):
    RemoteEngine(stand_in.url).complete(request())
    assert stand_in.auth == [None]


def test_unauthorized_is_one_clear_error_a_pause_then_a_retry(stand_in, fast_retries, caplog):
    stand_in.mode = "401"
    engine = RemoteEngine(stand_in.url, API_KEY)
    states = []
    engine.watch_status(lambda state, message: states.append((state, message)))
    with caplog.at_level("DEBUG"):
        assert engine.complete(request()) is None
        assert engine.state == "error" and "401" in engine.message and "apiKey" in engine.message
        assert engine.complete(request()) is None  # paused: the service is not asked again
        assert len(stand_in.requests) == 1
        assert engine.complete(request()) is None
        time.sleep(0.35)
        assert engine.complete(request()) is None and len(stand_in.requests) == 2  # retried: still refused
    assert [s for s, _ in states] == ["error"]  # the same error twice is one message
    assert sum("401" in r.getMessage() for r in caplog.records) == 1
    assert API_KEY not in caplog.text and API_KEY not in engine.message
    stand_in.mode = "ok"
    time.sleep(0.35)
    assert engine.complete(request()).candidates and engine.state == "ready" and states[-1][0] == "ready"


def test_unreachable_server_is_an_error_state_at_once_and_empty_answers_without_waiting(fast_retries):
    url = free_port_url()
    t0 = time.monotonic()
    engine = RemoteEngine(url, API_KEY)
    assert engine.state == "error" and "cannot reach" in engine.message and url in engine.message
    assert engine.complete(request()) is None
    time.sleep(0.35)
    assert engine.complete(request()) is None and engine.state == "error"
    assert time.monotonic() - t0 < 2.0


def test_loading_service_reports_loading_then_ready(stand_in, fast_retries):
    stand_in.mode = "503"
    engine = RemoteEngine(stand_in.url)
    assert engine.state == "loading"
    stand_in.mode = "ok"
    assert engine.complete(request()) is None  # still inside the loading pause
    time.sleep(0.35)
    assert engine.complete(request()).candidates and engine.state == "ready"


def test_busy_is_an_empty_answer_without_a_pause(stand_in):
    engine = RemoteEngine(stand_in.url)
    stand_in.mode = "429"
    assert engine.complete(request()) is None and engine.state == "ready"
    stand_in.mode = "ok"
    assert engine.complete(request()).candidates and len(stand_in.requests) == 2


def test_refused_request_is_empty_and_logged_without_a_pause(stand_in, caplog):
    engine = RemoteEngine(stand_in.url)
    stand_in.mode = "422"
    with caplog.at_level("WARNING"):
        assert engine.complete(request()) is None
    assert "422" in caplog.text and "mode 422" in caplog.text and DOC not in caplog.text
    stand_in.mode = "ok"
    assert engine.complete(request()).candidates


def test_cancel_closes_the_connection_and_the_service_sees_it(stand_in):
    engine = RemoteEngine(stand_in.url)
    stand_in.mode = "slow"
    r = request(deadline_ms=10_000)
    threading.Timer(0.2, r.cancel.cancel).start()
    t0 = time.monotonic()
    assert engine.complete(r) is None
    assert time.monotonic() - t0 < 0.6
    assert stand_in.cancelled.wait(2.0)
    stand_in.mode = "ok"
    assert engine.complete(request()).candidates and engine.state == "ready"  # a fresh connection


def test_a_service_that_restarted_between_keystrokes_is_reconnected(stand_in):
    engine = RemoteEngine(stand_in.url)
    assert engine.complete(request()).candidates
    engine._conn.sock.shutdown(socket.SHUT_RDWR)  # as if the server had closed the idle connection
    assert engine.complete(request()).candidates and engine.state == "ready"


def test_bad_urls_are_refused():
    with pytest.raises(ValueError, match="http"):
        RemoteEngine("ftp://example.org")


# -- settings -------------------------------------------------------------------------------------------
def test_server_and_key_settings_validate_and_never_echo_the_key():
    s, errors = apply_settings(Settings(), {"server": " http://team.example:8000/ ", "apiKey": API_KEY})
    assert not errors and s.server == "http://team.example:8000" and s.api_key == API_KEY
    assert API_KEY not in repr(s) and s.engine_key != Settings().engine_key
    s2, errors = apply_settings(s, {"server": "team.example", "apiKey": "two\nlines"})
    assert s2 == s and len(errors) == 2 and "http" in errors[0]
    assert all("two" not in e and API_KEY not in e for e in errors)
    s3, errors = apply_settings(s, {"isolate": False})
    assert not errors and s3.isolate is False and s3.engine_key != s.engine_key
    assert apply_settings(s, {"isolate": "no"})[1]


# -- the language server in remote mode (pytest-lsp) ---------------------------------------------------------
async def start_remote(url: str) -> object:
    client = make_test_lsp_client()
    track_status(client)
    await client.start_io(*SERVER, env=ENV)
    await client.initialize_session(types.InitializeParams(
        capabilities=CAPS, initialization_options={"codecomplete": {"server": url, "apiKey": API_KEY}}))
    return client


@pytest.mark.skipif(sys.platform == "win32", reason="pytest-lsp subprocess")
@pytest.mark.asyncio
async def test_lsp_remote_mode_inline_completion_cancellation_and_server_down(stand_in):
    client = await start_remote(stand_in.url)
    try:
        ready = await wait_for_state(client, "ready", timeout_s=30)
        assert stand_in.url in ready.message
        open_doc(client, DOC)
        items = await inline(client, 1, 7)
        assert [i.insert_text for i in items][:2] == ["nt(value)", "ntf(value)"]
        assert stand_in.requests[-1]["session"] and stand_in.auth[-1] == f"Bearer {API_KEY}"

        stand_in.mode = "slow"  # $/cancelRequest: answered at once, the service sees the connection close
        running = client.protocol.send_request(types.TEXT_DOCUMENT_INLINE_COMPLETION, inline_params(1, 7),
                                               msg_id="remote-slow")
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id="remote-slow"))
        with pytest.raises(JsonRpcException) as excinfo:
            await asyncio.wrap_future(running)
        assert excinfo.value.code == types.LSPErrorCodes.RequestCancelled and time.monotonic() - t0 < 1.0
        assert await asyncio.to_thread(stand_in.cancelled.wait, 3.0)

        stand_in.mode = "ok"
        assert await inline(client, 1, 7)
        stand_in.close()  # the service goes away: empty answers, one error message, status error
        n_status = len(client.statuses)
        t0 = time.monotonic()
        for _ in range(3):
            assert await inline(client, 1, 7) == []
        assert time.monotonic() - t0 < 3.0
        error = await wait_for_state(client, "error", after=n_status)
        assert stand_in.url in error.message
        shown = [m.message for m in client.messages if m.type == types.MessageType.Error]
        assert len(shown) == 1 and stand_in.url in shown[0]
        logs = " ".join(m.message for m in client.log_messages)
        assert API_KEY not in logs and "def show" not in logs

        other = StandIn()  # changing the server setting reconnects
        try:
            n_status = len(client.statuses)
            configure(client, server=other.url)
            assert other.url in (await wait_for_state(client, "ready", after=n_status, timeout_s=30)).message
            assert await inline(client, 1, 7) and len(other.requests) == 1
        finally:
            other.close()
    finally:
        await client.shutdown_session()


# -- the language server against the real Ray Serve application ----------------------------------------
MID_TOKEN_DOC = "import os\n\n\ndef data_file(name):\n    return os.path.jo\n"
SLOW_BODY = {"text": 'STORY = """\n', "offset": 12, "path": "blocker.py",
             "options": {"max_new_tokens": 1024, "multiline": True, "deadline_ms": 8000, "temperature": 5.0,
                         "patience_steps": None, "n": 8}}


@pytest.fixture(scope="module")
def team_server(serve_port):
    """The team server's application (one replica, one API key) on the session's Ray instance."""
    from ray import serve

    from codecomplete.serve.app import ServeSettings, build_app, wait_until_loaded
    from codecomplete.serve.auth import parse_keys

    settings = ServeSettings(keys=tuple(parse_keys(f"editor:{API_KEY}")))
    serve.run(build_app(replicas=1, threads=1, replica_cpus=0.5, settings=settings), name="lsp", route_prefix="/lsp")
    try:
        wait_until_loaded("lsp", 1, timeout_s=120)
        yield serve_port
    finally:
        if "lsp" in serve.status().applications:
            serve.delete("lsp")


def _cancelled_on_the_replica() -> int:
    from codecomplete.serve.app import wait_until_loaded

    return wait_until_loaded("lsp", 1, timeout_s=30)[0]["cancelled_requests"]


async def _wait_for_cancelled(count: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (seen := await asyncio.to_thread(_cancelled_on_the_replica)) < count:
        assert time.monotonic() < deadline, f"the replica saw {seen} cancelled requests, expected {count}"
        await asyncio.sleep(0.1)


@pytest.mark.skipif(sys.platform == "win32", reason="pytest-lsp subprocess")
@pytest.mark.asyncio
async def test_lsp_remote_mode_against_the_ray_app_completes_supersedes_and_reports_it_gone(team_server):
    url = f"http://127.0.0.1:{team_server}/lsp"
    client = make_test_lsp_client()
    track_status(client)
    await client.start_io(*SERVER, env=ENV)
    await client.initialize_session(types.InitializeParams(capabilities=CAPS, initialization_options={
        "codecomplete": {"server": url, "apiKey": API_KEY, "deadlineMs": 20000}}))
    try:
        assert url in (await wait_for_state(client, "ready", timeout_s=30)).message
        open_doc(client, MID_TOKEN_DOC)
        items = await inline(client, 4, 21)  # the cursor after `os.path.jo`: the engine aligns the token
        assert items and items[0].insert_text.startswith("in(")

        # a long request from someone else keeps the replica's engine busy; the editor's next
        # request waits behind it, and a keystroke supersedes it: the editor gets an empty
        # answer at once, the connection closes, and the replica's CancelToken fires
        before = await asyncio.to_thread(_cancelled_on_the_replica)
        blocker = socket.create_connection(("127.0.0.1", team_server), timeout=30)
        body = json.dumps(SLOW_BODY).encode()
        blocker.sendall(b"POST /lsp/v1/engine/complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        + f"Authorization: Bearer {API_KEY}\r\nX-Session-Id: blocker\r\n".encode()
                        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        try:
            await asyncio.sleep(1.0)
            first = client.protocol.send_request(types.TEXT_DOCUMENT_INLINE_COMPLETION, inline_params(4, 21),
                                                 msg_id="superseded")
            await asyncio.sleep(0.5)  # on its way: waiting at the replica behind the blocker
            edit(client, 2, 4, 21, "i")
            t0 = time.monotonic()
            second = asyncio.ensure_future(inline(client, 4, 22))
            superseded = await asyncio.wait_for(asyncio.wrap_future(first), timeout=5)
            assert not (superseded.items if isinstance(superseded, types.InlineCompletionList) else superseded)
            assert time.monotonic() - t0 < 2.0
            await _wait_for_cancelled(before + 1)
        finally:
            blocker.close()  # its request is cancelled too; the newer keystroke is answered
        assert await asyncio.wait_for(second, timeout=30)
        await _wait_for_cancelled(before + 2)

        from ray import serve

        await asyncio.to_thread(serve.delete, "lsp")  # the service goes away
        n_status = len(client.statuses)
        t0 = time.monotonic()
        for _ in range(3):
            assert await inline(client, 4, 22) == []
        assert time.monotonic() - t0 < 5.0
        error = await wait_for_state(client, "error", after=n_status)
        assert url in error.message and "404" in error.message
        shown = [m.message for m in client.messages if m.type == types.MessageType.Error]
        assert len(shown) == 1 and url in shown[0]
        logs = " ".join(m.message for m in client.log_messages)
        assert API_KEY not in logs and "data_file" not in logs
    finally:
        await client.shutdown_session()
