"""pygls's LanguageServerProtocol, made to answer every request and never to nag the user.

Stock pygls 2.1, given a request whose params do not validate, raises inside JSON
decoding: the request gets no response at all and the user gets a window/showMessage.
Here a malformed message becomes a MalformedMessage value; a request among them is
answered with -32602 (or -32600), everything else is logged. pygls's own document store
is bypassed (the server keeps its own, see documents.py), and UTF-8 positions are
preferred whenever the client offers them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import attrs
import cattrs
from lsprotocol import types
from pygls.capabilities import ServerCapabilitiesBuilder
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams, JsonRpcInvalidRequest
from pygls.protocol import LanguageServerProtocol, lsp_method
from pygls.protocol.json_rpc import (
    JsonRPCNotification,
    JsonRPCRequestMessage,
    JsonRPCResponseMessage,
    RPCRequest,
)

logger = logging.getLogger("codecomplete.lsp.protocol")

JSONRPC_VERSION = "2.0"


def valid_id(msg_id: Any) -> bool:
    """LSP request ids are integers or strings (never null: a response must name its request)."""
    return isinstance(msg_id, (int, str)) and not isinstance(msg_id, bool)


@dataclass
class MalformedMessage:
    """A JSON-RPC message that could not be turned into its LSP type."""

    data: dict
    reason: str

    @property
    def msg_id(self) -> int | str | None:
        msg_id = self.data.get("id")
        return msg_id if valid_id(msg_id) else None


def _describe(exc: Exception) -> str:
    try:
        return "; ".join(cattrs.transform_error(exc))
    except Exception:
        return str(exc) or type(exc).__name__


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class CodecompleteProtocol(LanguageServerProtocol):
    """Answers or logs every message; prefers UTF-8 positions."""

    position_encoding: str = types.PositionEncodingKind.Utf16.value

    # -- decoding ---------------------------------------------------------------------
    def structure_message(self, data: dict[str, Any]):
        """Called by json.loads for every object; only JSON-RPC messages are structured."""
        if "jsonrpc" not in data or not ("method" in data or "id" in data):
            return data
        try:
            if "id" in data:
                if "error" in data:
                    return self._converter.structure(data, types.ResponseErrorMessage)
                if "method" in data:
                    request_type = self.get_message_type(data["method"]) or JsonRPCRequestMessage
                    if not hasattr(request_type, "__attrs_attrs__") or "id" not in attrs.fields_dict(request_type):
                        # A notification method sent with an id: pygls would run it and never answer.
                        return MalformedMessage(data, f"{data['method']} is a notification and takes no id")
                    return self._converter.structure(data, request_type)
                response_type = self._result_types.pop(data["id"], None) or JsonRPCResponseMessage
                return self._converter.structure(data, response_type)
            notification_type = self.get_message_type(data.get("method", "")) or JsonRPCNotification
            return self._converter.structure(data, notification_type)
        except Exception as exc:  # ClassValidationError, TypeError (unhashable id), ...
            return MalformedMessage(data, _describe(exc))

    # -- dispatch ---------------------------------------------------------------------
    def handle_message(self, message: Any):
        if isinstance(message, MalformedMessage):
            self._handle_malformed(message)
            return
        if not hasattr(message, "jsonrpc"):
            logger.warning("ignoring a message that is not JSON-RPC: %s", _short(message))
            self._reject_if_request(message, "not a JSON-RPC 2.0 message")
            return
        if isinstance(message, RPCRequest) and not valid_id(message.id):
            logger.warning("ignoring request %r with an invalid id %r", message.method, message.id)
            return
        if message.jsonrpc != JSONRPC_VERSION:
            logger.warning("ignoring a message with jsonrpc=%r", message.jsonrpc)
            if isinstance(message, RPCRequest):
                self._send_error(message.id, JsonRpcInvalidRequest(f"unsupported jsonrpc version {message.jsonrpc!r}"))
            return
        if self._shutdown and isinstance(message, RPCRequest) and message.method != types.EXIT:
            self._send_error(message.id, JsonRpcInvalidRequest(f"{message.method}: the server is shutting down"))
            return
        super().handle_message(message)

    def _handle_malformed(self, message: MalformedMessage) -> None:
        data, msg_id = message.data, message.msg_id
        method = data.get("method")
        if "id" in data and isinstance(method, str):
            logger.warning("invalid params for %s (id %r): %s", method, data.get("id"), message.reason)
            if msg_id is not None:
                self._send_error(msg_id, JsonRpcInvalidParams(f"invalid params for {method}: {message.reason}"))
        elif "id" in data and method is None:
            logger.warning("malformed response from the client (id %r): %s", data.get("id"), message.reason)
            future = self._request_futures.pop(msg_id, None) if msg_id is not None else None
            if future is not None and not future.done():
                future.set_exception(JsonRpcException(f"malformed response: {message.reason}"))
        else:
            logger.warning("ignoring malformed notification %r: %s", method, message.reason)

    def _reject_if_request(self, message: Any, reason: str) -> None:
        if isinstance(message, dict) and "method" in message:
            msg_id = MalformedMessage(message, reason).msg_id
            if msg_id is not None:
                self._send_error(msg_id, JsonRpcInvalidRequest(f"invalid request: {reason}"))

    def _send_error(self, msg_id: int | str, error: JsonRpcException) -> None:
        if valid_id(msg_id):
            self._send_response(msg_id, error=error.to_response_error())

    def _handle_cancel_notification(self, msg_id):
        # Clients cancel requests that have already been answered all the time: not news.
        future = self._request_futures.pop(msg_id, None)
        if future is not None and future.cancel():
            logger.debug("cancelled request %r", msg_id)

    # -- lifecycle --------------------------------------------------------------------
    @property
    def shutdown_received(self) -> bool:
        """Whether the client sent shutdown; exiting without it is exit code 1 (the LSP rule)."""
        return self._shutdown

    @lsp_method(types.INITIALIZE)
    def lsp_initialize(self, params: types.InitializeParams):
        """pygls's initialize, preferring UTF-8 positions when the client offers them."""
        general = params.capabilities.general
        offered = list(general.position_encodings or []) if general else []
        if types.PositionEncodingKind.Utf8 in offered:
            offered.remove(types.PositionEncodingKind.Utf8)
            general.position_encodings = [types.PositionEncodingKind.Utf8, *offered]
        encoding = ServerCapabilitiesBuilder.choose_position_encoding(params.capabilities)
        self.position_encoding = getattr(encoding, "value", encoding)
        return (yield from super().lsp_initialize(params))

    # The server keeps its own documents (documents.py); pygls's copy would cost a second
    # O(n) update per keystroke and clamps out-of-range positions by mutating the params.
    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params: types.DidOpenTextDocumentParams):
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_OPEN)) is not None:
            yield handler, (params,), None

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams):
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_CHANGE)) is not None:
            yield handler, (params,), None

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: types.DidCloseTextDocumentParams):
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_CLOSE)) is not None:
            yield handler, (params,), None
