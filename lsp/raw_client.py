"""A pytest-lsp test client that can also send requests as raw dicts, unvalidated (garbage tests).

Needs the test extra (pytest-lsp). Use it as a ClientServerConfig's client_factory, or
make_raw_client() directly; then `await send_raw_request(client, {"jsonrpc": "2.0", "id": 1, ...})`.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import Future

from pygls.protocol import default_converter
from pytest_lsp import LanguageClient, LanguageClientProtocol
from pytest_lsp.client import register_lsp_features

from .testing import write_raw


class RawRequestProtocol(LanguageClientProtocol):
    """pytest-lsp's client protocol, plus responses awaited for requests it did not send itself."""

    def expect_response(self, msg_id: int | str) -> Future:
        """A future for the response to msg_id: its result, or its error raised."""
        future: Future = Future()
        self._request_futures[msg_id] = future  # where pygls looks when a response arrives
        return future


def make_raw_client() -> LanguageClient:
    """A pytest-lsp LanguageClient (with its default client features) that can send raw requests."""
    client = LanguageClient(converter_factory=default_converter, protocol_cls=RawRequestProtocol)
    register_lsp_features(client)
    return client


def send_raw_request(client: LanguageClient, message: dict) -> asyncio.Future:
    """Send a request dict as-is through a client made by make_raw_client; await it for the result."""
    if not isinstance(client.protocol, RawRequestProtocol):
        raise TypeError("send_raw_request needs a client from make_raw_client()")
    future = client.protocol.expect_response(message["id"])
    write_raw(client, json.dumps(message).encode("utf-8"))
    return asyncio.wrap_future(future)
