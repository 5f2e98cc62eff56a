"""What every API shape of the team server shares: the error shape, stop strings, session keys."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ValidationError

from codecomplete.request import Completion

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_STOP_STRINGS = 16
# candidates drawn when a client asks for fewer: the reranker needs some to choose from
MIN_CANDIDATES_DRAWN = 4


class ApiError(Exception):
    """An answer other than 200: status, message and an OpenAI-style error type."""

    def __init__(self, status: int, message: str, kind: str):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def __reduce__(self):  # raised in one replica, re-raised in another: pickled across
        return ApiError, (self.status, self.message, self.kind)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "code": self.status}}


def invalid(message: str) -> ApiError:
    return ApiError(422, message, "invalid_request_error")


def parse_body(model: type[BaseModel], raw: Any) -> BaseModel:
    """A request model from a JSON value; 422 naming the first bad field."""
    if not isinstance(raw, dict):
        raise invalid("expected a JSON object")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise invalid(f"{where}: {first['msg']}") from None


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, str]:
    """The text before the earliest stop string, and that string ("" when none occurs)."""
    cut, word = len(text), ""
    for stop in stops:
        at = text.find(stop) if stop else -1
        if 0 <= at < cut:
            cut, word = at, stop
    return text[:cut], word


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid(f"stop: at most {MAX_STOP_STRINGS} strings")
    return [s for s in stops if s]


def is_warm(completion: Completion) -> bool:
    """Answered from what this replica kept: the typing cache or a reused prefix KV."""
    return completion.source in ("warm", "cache")


def text_session(owner: str, text: str) -> str:
    """A session key from a request's first line when the client names nothing better: the
    first line of a file (or of the window an editor sends) rarely changes while typing."""
    first_line = text.split("\n", 1)[0]
    return f"{owner}/{hashlib.sha256(first_line.encode('utf-8', 'replace')).hexdigest()[:16]}"


def drawn_candidates(wanted: int) -> int:
    return max(wanted, MIN_CANDIDATES_DRAWN)


def join_with_token_if_available() -> None:
    """Before joining a cluster: `ray start` turns Ray's token authentication on when it
    finds a token (and makes one on a new head), but a driver that joins it does not, and
    is refused ("Authentication token is missing"). Ray's own rule for its workers, applied
    here: with a token at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) and
    no RAY_AUTH_MODE chosen, use it."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def start_ray(address: str | None = None, **options: Any) -> None:
    """ray.init from a neutral folder (below): a local instance, or joining `address`
    (HOST:PORT of a cluster's head, or auto). A local instance is always a new one: Ray's
    own default would join a cluster that `ray start` left running on this machine."""
    import ray

    if address:
        join_with_token_if_available()
    with neutral_folder():
        ray.init(address=address or "local", include_dashboard=False if not address else None, **options)


# Ray Serve's proxy writes an access log line per request; the team server's own log line
# (the key's name, no document text) is enough, and the proxy's costs time per keystroke
SERVE_LOGGING = {"enable_access_log": False}


@contextlib.contextmanager
def neutral_folder() -> Iterator[None]:
    """Start a local Ray inside this: its workers start in the driver's folder and put it on
    sys.path, so from a source checkout they would import its codecomplete/ folder (which
    is not the installed package) instead of the package."""
    here = os.getcwd()
    os.chdir(tempfile.gettempdir())
    try:
        yield
    finally:
        os.chdir(here)
