"""A client of the team service with the engine's face: `RemoteEngine.complete(request)`
sends the request to `POST {server}/v1/engine/complete` and reads the Completion back.

The body is `wire.request_to_json(request)` plus a `session` key that is stable per
document and per client process, also sent as Ray Serve's `X-Session-Id` header: the
service's proxy routes by it, so one user's keystrokes on one file go straight to the
replica that holds their KV. One keep-alive connection (the language server calls from
one worker thread); a cancelled request closes it, which cancels the work on the server.
Failures never raise: the answer is None, and the state (ready | loading | error) with
its message tells the editor why. Unreachable, 401 and server errors pause requests for a
growing interval; 429 (busy) is just an empty answer. The API key is never logged.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import select
import ssl
import threading
import time
from urllib.parse import urlsplit

from codecomplete.isolation import EngineStatus
from codecomplete.request import CancelToken, Completion, CompletionRequest
from codecomplete.wire import WireError, completion_from_json, outgoing_request_json

logger = logging.getLogger("codecomplete.remote")

COMPLETE_PATH = "/v1/engine/complete"
HEALTH_PATH = "/health"
SESSION_HEADER = "X-Session-Id"  # Ray Serve's session header (codecomplete.serve.native)
CONNECT_TIMEOUT_S = 2.0  # also the health check's whole budget
ANSWER_GRACE_S = 2.0  # how long past the request's deadline an answer may take
CANCEL_POLL_S = 0.005
RETRY_PAUSES_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # after failure k in a row (the last repeats)
LOADING_PAUSE_S = 1.0  # between tries while the service loads its model (503)


class RemoteError(Exception):
    """A failure with the message the editor shows and whether to pause before retrying."""

    def __init__(self, state: str, message: str, pause: bool = True):
        super().__init__(message)
        self.state, self.message, self.pause = state, message, pause


def public_url(url: str) -> str:
    """The URL without credentials or query (what a message may show)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _error_text(body: bytes) -> str:
    """The service's `{"error": {"message": ...}}`, or nothing."""
    try:
        error = json.loads(body.decode("utf-8")).get("error", {})
        return str(error.get("message", ""))[:300] if isinstance(error, dict) else ""
    except (ValueError, AttributeError, UnicodeDecodeError):
        return ""


class RemoteEngine(EngineStatus):
    """The team service as an engine (see the module docstring)."""

    def __init__(self, server_url: str, api_key: str = "", check_health: bool = True):
        parts = urlsplit(server_url.strip().rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// server URL, got {public_url(server_url)!r}")
        self.url = public_url(server_url.strip().rstrip("/"))
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._base_path = parts.path.rstrip("/")
        self._api_key = api_key
        self._session_salt = os.urandom(16).hex()  # per process: sessions of two editors never collide
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()
        self._failures = 0
        self._retry_at = 0.0
        self.state, self.message = "ready", f"team server {self.url}"
        self.replica = ""
        self.warm: bool | None = None
        if check_health:
            self._check_health()

    # -- the engine's face ------------------------------------------------------------
    def describe(self) -> dict:
        return {"runtime": "remote", "server": self.url, "replica": self.replica, "state": self.state}

    def session_key(self, path: str) -> str:
        """Stable for one document in this process, meaningless elsewhere."""
        return hashlib.sha256(f"{self._session_salt}\0{path}".encode()).hexdigest()[:32]

    def complete(self, request: CompletionRequest) -> Completion | None:
        """The service's answer; None when cancelled, busy, paused after a failure, or failed."""
        if time.monotonic() < self._retry_at:
            return None
        body = outgoing_request_json(request)
        if body is None:  # a document that gets no completions (too big, binary)
            return Completion([])
        body["session"] = session = self.session_key(request.path or "<untitled>")
        payload = json.dumps(body).encode("utf-8")
        deadline_s = body["options"]["deadline_ms"] / 1000.0
        try:
            status, headers, answer = self._post(payload, session, request.cancel, deadline_s)
        except RemoteError as e:
            self._failed(e)
            return None
        if status is None:  # cancelled: the connection is closed, the server stops
            return None
        return self._read_answer(status, headers, answer)

    def close(self) -> None:
        self._drop_connection()

    # -- HTTP ---------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _new_connection(self, timeout_s: float) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout_s,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout_s)

    def _drop_connection(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _post(self, payload: bytes, session: str, cancel: CancelToken | None, deadline_s: float):
        """(status, headers, body) of one POST; (None, None, None) when cancelled first.
        A kept-alive connection that the server closed meanwhile is retried once, fresh."""
        for attempt in (0, 1):
            reused = self._conn is not None
            conn = self._conn or self._new_connection(min(CONNECT_TIMEOUT_S, deadline_s + ANSWER_GRACE_S))
            self._conn = conn
            try:
                if conn.sock is None:
                    conn.connect()
                conn.sock.settimeout(deadline_s + ANSWER_GRACE_S)
                conn.request("POST", self._base_path + COMPLETE_PATH, body=payload,
                             headers={**self._headers(), SESSION_HEADER: session})
                if not self._wait_readable(conn, cancel, time.monotonic() + deadline_s + ANSWER_GRACE_S):
                    self._drop_connection()
                    return None, None, None
                response = conn.getresponse()
                body = response.read()
                if response.will_close:
                    self._drop_connection()
                return response.status, response.headers, body
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self._drop_connection()
                if reused and attempt == 0:
                    continue  # the idle connection was closed by the server: once more, fresh
                raise RemoteError("error", f"the team server {self.url} closed the connection ({type(e).__name__})") from None
            except TimeoutError:
                self._drop_connection()
                raise RemoteError("error", f"the team server {self.url} did not answer in time") from None
            except (OSError, http.client.HTTPException) as e:
                self._drop_connection()
                reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
                raise RemoteError("error", f"cannot reach the team server {self.url}: {reason}") from None
        raise RemoteError("error", f"the team server {self.url} closed the connection")

    @staticmethod
    def _wait_readable(conn: http.client.HTTPConnection, cancel: CancelToken | None, give_up_at: float) -> bool:
        """Wait for the answer to begin; False when the request was cancelled first."""
        sock = conn.sock
        while True:
            if cancel is not None and cancel.cancelled:
                return False
            if getattr(sock, "pending", lambda: 0)():  # TLS bytes already decrypted
                return True
            readable, _, _ = select.select([sock], [], [], CANCEL_POLL_S)
            if readable:
                return True
            if time.monotonic() > give_up_at:
                raise TimeoutError

    def _read_answer(self, status: int, headers, body: bytes) -> Completion | None:
        if status == 200:
            try:
                completion = completion_from_json(json.loads(body.decode("utf-8")))
            except (ValueError, UnicodeDecodeError, WireError) as e:
                self._failed(RemoteError("error", f"the team server {self.url} sent an answer we cannot read: {e}"))
                return None
            self.replica = headers.get("X-Codecomplete-Replica", "") or ""
            warm = headers.get("X-Codecomplete-Warm")
            self.warm = None if warm is None else warm.strip().lower() in ("1", "true", "yes")
            self._succeeded()
            return completion
        detail = _error_text(body)
        detail = f": {detail}" if detail else ""
        if status == 429:  # busy: this keystroke goes unanswered, the next one tries again
            logger.debug("the team server is busy (429)")
            return None
        if status == 401:
            self._failed(RemoteError("error", f"the team server {self.url} refused the API key (401){detail}; "
                                              "set codecomplete.apiKey"))
        elif status == 503:
            self._failed(RemoteError("loading", f"the team server {self.url} is loading its model"))
        elif status == 404:  # something answers there, but not (or no longer) our service
            self._failed(RemoteError("error", f"the team server {self.url} has no codecomplete service at this "
                                              "address (404); check codecomplete.server"))
        elif status in (400, 413, 422):  # this request was refused; the next one may be fine
            logger.warning("the team server refused a request (%d)%s", status, detail)
        else:
            self._failed(RemoteError("error", f"the team server {self.url} failed ({status}){detail}"))
        return None

    def _check_health(self) -> None:
        """At start: is the service there and ready? Sets the state; never raises."""
        conn = self._new_connection(CONNECT_TIMEOUT_S)
        try:
            conn.request("GET", self._base_path + HEALTH_PATH, headers={"Accept": "application/json"})
            response = conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
            self._failed(RemoteError("error", f"cannot reach the team server {self.url}: {reason}"))
            return
        if response.will_close:
            conn.close()
        else:
            self._conn = conn  # the first completion goes over the same connection
        if response.status == 503:
            self._failed(RemoteError("loading", f"the team server {self.url} is loading its model"))
        elif response.status != 200:
            self._failed(RemoteError("error", f"the team server {self.url} is not healthy ({response.status})"))

    # -- state ------------------------------------------------------------------------------
    def _failed(self, error: RemoteError) -> None:
        if error.state == "loading":
            self._retry_at = time.monotonic() + LOADING_PAUSE_S
        elif error.pause:
            self._failures += 1
            self._retry_at = time.monotonic() + RETRY_PAUSES_S[min(self._failures, len(RETRY_PAUSES_S)) - 1]
        if (error.state, error.message) != (self.state, self.message):
            log = logger.error if error.state == "error" else logger.info
            log("%s (requests paused, retrying)", error.message)
            self._set_state(error.state, error.message)

    def _succeeded(self) -> None:
        self._failures, self._retry_at = 0, 0.0
        if self.state != "ready":
            logger.info("the team server %s answers again", self.url)
            self._set_state("ready", f"team server {self.url}")


__all__ = ["RemoteEngine", "RemoteError", "public_url", "COMPLETE_PATH", "HEALTH_PATH"]
