"""OpenAI's `POST /v1/completions` (with `suffix`: fill in the middle) and `GET /v1/models`.

`n` answers are the top of the reranked candidates (at least four are drawn, so the
reranker has a choice even for n=1); `user` is the session key when given.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from codecomplete.request import Completion, CompletionOptions, CompletionRequest
from codecomplete.serve.common import (
    cut_at_stop,
    drawn_candidates,
    invalid,
    stop_list,
    text_session,
)

FINISH_REASONS = {"max_tokens": "length", "deadline": "length"}  # anything else: "stop"


class CompletionsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = ""
    prompt: str | list[str] = ""
    suffix: str | None = None
    max_tokens: int = Field(16, ge=0, le=4096)
    n: int = Field(1, ge=1, le=32)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str = ""
    stream: bool = False
    # ours: the file's name and language, so the prompt and the reranker know them
    path: str = ""
    language: str = ""


def prompt_text(body: CompletionsRequest) -> str:
    if isinstance(body.prompt, str):
        return body.prompt
    if len(body.prompt) > 1:
        raise invalid("prompt: one prompt per request (a list of one string at most)")
    return body.prompt[0] if body.prompt else ""


def to_completion_request(body: CompletionsRequest) -> CompletionRequest:
    prefix, suffix = prompt_text(body), body.suffix or ""
    stop_list(body.stop)  # the count check
    options = CompletionOptions(n=drawn_candidates(body.n), max_new_tokens=body.max_tokens)
    if body.temperature is not None:
        options.temperature = body.temperature
    if body.top_p is not None:
        options.top_p = body.top_p
    if body.seed is not None:
        options.seed = body.seed
    return CompletionRequest(text=prefix + suffix, offset=len(prefix), language=body.language, path=body.path,
                             options=options)


def session_key(body: CompletionsRequest, owner: str) -> str:
    if body.user:
        return f"{owner}/user/{body.user}/{body.path}"
    if body.path:
        return f"{owner}/{body.path}"
    return text_session(owner, prompt_text(body))


def choices(completion: Completion, body: CompletionsRequest) -> list[dict[str, Any]]:
    stops = stop_list(body.stop)
    out = []
    for index, c in enumerate(completion.candidates[: body.n]):
        text, word = cut_at_stop(c.text, stops)
        reason = "stop" if word else FINISH_REASONS.get(c.stop_reason, "stop")
        out.append({"text": text, "index": index, "logprobs": None, "finish_reason": reason})
    return out


def to_response(completion: Completion, body: CompletionsRequest, model_name: str) -> dict[str, Any]:
    prompt_tokens = completion.prefill_reused_tokens + completion.prefill_new_tokens
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices(completion, body),
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion.tokens_generated,
                  "total_tokens": prompt_tokens + completion.tokens_generated},
    }


def stream_chunks(response: dict[str, Any]) -> list[dict[str, Any]]:
    """Server-sent event payloads: each choice's text, then each choice's finish reason
    (the engine answers whole candidates, so a stream carries one text chunk per choice)."""
    head = {k: response[k] for k in ("id", "object", "created", "model")}
    chunks = [{**head, "choices": [{**c, "finish_reason": None}]} for c in response["choices"]]
    chunks += [{**head, "choices": [{**c, "text": ""}]} for c in response["choices"]]
    return chunks


def models_response(model_name: str, created: int) -> dict[str, Any]:
    return {"object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "codecomplete"}]}
