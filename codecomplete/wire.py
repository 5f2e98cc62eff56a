"""The engine's request and answer as JSON: what crosses a process or network boundary.

The team server's native endpoint (`POST /v1/engine/complete`) takes `request_to_json`'s
shape and answers `completion_to_json`'s; the language server's remote mode sends and reads
the same, so token alignment, N candidates, reranking and the typing cache behave alike
in-process and remote. Unknown keys are ignored (newer clients, older servers); wrong types
and out-of-range values raise `WireError` with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from codecomplete.request import (
    Candidate,
    Completion,
    CompletionOptions,
    CompletionRequest,
    Neighbour,
)
from codecomplete.text import windowed_request

MAX_NEIGHBOURS = 32
# option -> (type, lowest, highest) for the fields a client may set; None: no bound
OPTION_LIMITS: dict[str, tuple[type, float | None, float | None]] = {
    "n": (int, 1, 32),
    "max_new_tokens": (int, 0, 4096),
    "temperature": (float, 0.0, 5.0),
    "top_p": (float, 0.0, 1.0),
    "seed": (int, None, None),
    "align": (bool, None, None),
    "back_off_tokens": (int, 0, 16),
    "rerank": (bool, None, None),
    "deadline_ms": (float, 1.0, 600_000.0),
    "patience_steps": (int, 0, 4096),
    "prefix_tokens": (int, 0, 1 << 20),
    "suffix_tokens": (int, 0, 1 << 20),
    "neighbour_tokens": (int, 0, 1 << 20),
}
NULLABLE_OPTIONS = {"multiline", "patience_steps", "back_off_needed"}


class WireError(ValueError):
    """A request that does not have the documented shape; the message names the field."""


def _typed(name: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise WireError(f"{name}: expected true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WireError(f"{name}: expected a number, got {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise WireError(f"{name}: expected a whole number, got {value!r}")
        return int(value)
    if not math.isfinite(value):
        raise WireError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise WireError(f"{name}: expected a string, got {type(value).__name__}")
    return value


def options_from_json(raw: Any, base: CompletionOptions | None = None) -> CompletionOptions:
    """CompletionOptions from a JSON object of its field names; unknown keys are ignored."""
    options = dataclasses.replace(base) if base is not None else CompletionOptions()
    if raw is None:
        return options
    if not isinstance(raw, dict):
        raise WireError("options: expected an object")
    for key, value in raw.items():
        if value is None and key in NULLABLE_OPTIONS:
            setattr(options, key, None)
        elif key in ("multiline", "back_off_needed"):
            setattr(options, key, _typed(f"options.{key}", value, bool))
        elif key in OPTION_LIMITS:
            kind, lo, hi = OPTION_LIMITS[key]
            v = _typed(f"options.{key}", value, kind)
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise WireError(f"options.{key}: must be between {lo:g} and {hi:g}, got {v!r}")
            setattr(options, key, v)
    return options


def options_to_json(options: CompletionOptions) -> dict[str, Any]:
    return dataclasses.asdict(options)


def request_to_json(request: CompletionRequest) -> dict[str, Any]:
    """The request's content (not its cancel token or deadline, which stay local)."""
    return {
        "text": request.text,
        "offset": request.offset,
        "language": request.language,
        "path": request.path,
        "neighbours": [{"path": n.path, "text": n.text, "language": n.language} for n in request.neighbours],
        "options": options_to_json(request.options),
    }


def outgoing_request_json(request: CompletionRequest) -> dict[str, Any] | None:
    """What another process (the engine's child, the team server) gets for a request: the
    document windowed as the engine would (the window, not megabytes, crosses every keystroke),
    its options with the time left until the request's deadline; None when the document
    gets no completions (too big, binary)."""
    windowed = windowed_request(request)
    if windowed is None:
        return None
    body = request_to_json(windowed)
    body["options"]["deadline_ms"] = max(1.0, (request.due() - time.monotonic()) * 1000.0)
    return body


def request_from_json(raw: Any, base_options: CompletionOptions | None = None) -> CompletionRequest:
    """A CompletionRequest from `request_to_json`'s shape; WireError names a bad field."""
    if not isinstance(raw, dict):
        raise WireError("expected a JSON object")
    text = _string("text", raw.get("text", ""))
    offset = _typed("offset", raw.get("offset", len(text)), int)
    if not 0 <= offset <= len(text):
        raise WireError(f"offset: {offset} is outside the text (0..{len(text)})")
    neighbours_raw = raw.get("neighbours") or []
    if not isinstance(neighbours_raw, list):
        raise WireError("neighbours: expected a list")
    neighbours = []
    for i, n in enumerate(neighbours_raw[:MAX_NEIGHBOURS]):
        if not isinstance(n, dict):
            raise WireError(f"neighbours[{i}]: expected an object")
        neighbours.append(Neighbour(path=_string(f"neighbours[{i}].path", n.get("path", "")),
                                    text=_string(f"neighbours[{i}].text", n.get("text", "")),
                                    language=_string(f"neighbours[{i}].language", n.get("language", ""))))
    return CompletionRequest(text=text, offset=offset, language=_string("language", raw.get("language", "")),
                             path=_string("path", raw.get("path", "")), neighbours=neighbours,
                             options=options_from_json(raw.get("options"), base_options))


def candidate_to_json(c: Candidate) -> dict[str, Any]:
    return {"text": c.text, "score": c.score, "logprob": c.logprob, "syntax_ok": c.syntax_ok,
            "score_parts": dict(c.score_parts), "tokens": c.tokens, "stop_reason": str(c.stop_reason)}


def completion_to_json(completion: Completion) -> dict[str, Any]:
    return {
        "candidates": [candidate_to_json(c) for c in completion.candidates],
        "timings_ms": {k: round(v, 3) for k, v in completion.timings_ms.items()},
        "source": completion.source,
        "tokens_generated": completion.tokens_generated,
        "model_calls": completion.model_calls,
        "cached": completion.cached,
        "cancelled": completion.cancelled,
        "prefill_reused_tokens": completion.prefill_reused_tokens,
        "prefill_new_tokens": completion.prefill_new_tokens,
        "prefill_adopted_tokens": completion.prefill_adopted_tokens,
    }


def completion_from_json(raw: Any) -> Completion:
    """A Completion from `completion_to_json`'s shape (what a remote engine answered)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("candidates"), list):
        raise WireError("expected an object with a list of candidates")
    fields = {f.name for f in dataclasses.fields(Candidate)}
    candidates = []
    for i, c in enumerate(raw["candidates"]):
        if not isinstance(c, dict) or not isinstance(c.get("text"), str):
            raise WireError(f"candidates[{i}]: expected an object with a text")
        candidates.append(Candidate(**{k: v for k, v in c.items() if k in fields}))
    ints = ("tokens_generated", "model_calls", "prefill_reused_tokens", "prefill_new_tokens",
            "prefill_adopted_tokens")
    timings = raw.get("timings_ms") if isinstance(raw.get("timings_ms"), dict) else {}
    return Completion(candidates, {k: float(v) for k, v in timings.items() if isinstance(v, (int, float))},
                      cached=bool(raw.get("cached", False)), cancelled=bool(raw.get("cancelled", False)),
                      **{k: int(raw.get(k, 0) or 0) for k in ints})


__all__ = ["WireError", "request_to_json", "request_from_json", "completion_to_json", "completion_from_json",
           "options_from_json", "options_to_json"]
