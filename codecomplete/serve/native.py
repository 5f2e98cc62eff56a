"""`POST /v1/engine/complete`: the engine's own request and answer (codecomplete.wire), what
the language server's remote mode sends; nothing is lost between the editor and the engine."""

from __future__ import annotations

from typing import Any

from codecomplete.request import Completion, CompletionRequest
from codecomplete.serve.common import invalid
from codecomplete.wire import WireError, completion_to_json, request_from_json

# Ray Serve's session header: its proxy hands the value to the request router, so a request
# that carries it goes straight to its session's replica
SESSION_HEADER = "x-session-id"


def to_completion_request(raw: Any) -> CompletionRequest:
    try:
        return request_from_json(raw)
    except WireError as e:
        raise invalid(str(e)) from None


def session_key(raw: dict[str, Any], header: str | None, owner: str) -> str:
    """The header's session, else the body's, else the key's name and the file path."""
    if header:
        return f"{owner}/{header}"
    session = raw.get("session")
    if session is not None and not isinstance(session, str):
        raise invalid("session: expected a string")
    if session:
        return f"{owner}/{session}"
    return f"{owner}/{raw.get('path') or ''}"


def to_response(completion: Completion, replica: str) -> dict[str, Any]:
    return {**completion_to_json(completion), "replica": replica}
