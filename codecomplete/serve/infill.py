"""llama.cpp server's `POST /infill`, so llama.vim and llama.vscode work unchanged.

The cursor's prefix is `input_prefix + prompt` (llama.cpp: `prompt` is the text typed on
the cursor line), the suffix `input_suffix`, other files' snippets `input_extra`. Fields we
accept for compatibility but have no use for (`top_k`, `samplers`, `cache_prompt`,
`n_indent`: the engine's scope rules decide line ends and indentation) are checked for type
and otherwise ignored; unknown fields are ignored, as llama.cpp does.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from codecomplete.request import Completion, CompletionOptions, CompletionRequest, Neighbour
from codecomplete.serve.common import cut_at_stop, drawn_candidates, stop_list, text_session
from codecomplete.wire import MAX_NEIGHBOURS

DEFAULT_DEADLINE_MS = CompletionOptions().deadline_ms


class ExtraChunk(BaseModel):
    model_config = ConfigDict(extra="ignore")
    filename: str = ""
    text: str = ""


class InfillRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraChunk] = Field(default_factory=list)
    prompt: str = ""
    n_predict: int = Field(-1, ge=-1, le=4096)  # -1: the engine's default; 0: only warm the cache
    t_max_predict_ms: float = Field(0.0, ge=0.0, le=600_000.0)  # 0: our default deadline
    stop: list[str] = Field(default_factory=list)
    n_indent: int = Field(0, ge=0, le=1024)
    top_k: int = Field(40, ge=0, le=100_000)
    top_p: float = Field(0.95, ge=0.0, le=1.0)
    temperature: float = Field(0.8, ge=0.0, le=5.0)
    samplers: list[str] | str = Field(default_factory=list)
    cache_prompt: bool = True
    id_slot: int = Field(-1, ge=-1)
    stream: bool = False
    response_fields: list[str] = Field(default_factory=list)
    n_cmpl: int = Field(1, ge=1, le=32)  # answers wanted (the top of the ranked candidates)
    # ours: the file's name and language, which llama.cpp's clients do not send
    path: str = ""
    language: str = ""


def to_completion_request(body: InfillRequest) -> CompletionRequest:
    prefix = body.input_prefix + body.prompt
    options = CompletionOptions(n=drawn_candidates(body.n_cmpl), top_p=body.top_p, temperature=body.temperature)
    if body.n_predict >= 0:
        options.max_new_tokens = body.n_predict
    options.deadline_ms = body.t_max_predict_ms or DEFAULT_DEADLINE_MS
    stop_list(body.stop)  # the count check
    neighbours = [Neighbour(path=c.filename, text=c.text) for c in body.input_extra[:MAX_NEIGHBOURS]]
    return CompletionRequest(text=prefix + body.input_suffix, offset=len(prefix), language=body.language,
                             path=body.path, neighbours=neighbours, options=options)


def session_key(body: InfillRequest, owner: str) -> str:
    """id_slot (the client's own cache slot) with the file name if sent; else the first line
    of the window before the cursor (llama.vim sends a window of lines around it)."""
    if body.id_slot >= 0:
        return f"{owner}/slot{body.id_slot}/{body.path}"
    if body.path:
        return f"{owner}/{body.path}"
    return text_session(owner, body.input_prefix + body.prompt)


STOP_TYPES = {"eos": "eos", "line": "eos", "block": "eos", "max_tokens": "limit", "deadline": "limit"}


def to_response(completion: Completion, body: InfillRequest, model_name: str) -> dict[str, Any]:
    """llama.cpp's /infill answer, plus `candidates` (every ranked text, stop strings applied)."""
    stops = stop_list(body.stop)
    texts, words = [], []
    for c in completion.candidates:
        text, word = cut_at_stop(c.text, stops)
        texts.append(text)
        words.append(word)
    top = completion.candidates[0] if completion.candidates else None
    stop_type = "word" if words and words[0] else STOP_TYPES.get(top.stop_reason, "none") if top else "none"
    t = completion.timings_ms
    prompt_ms = t.get("prompt", 0.0) + t.get("prefill", 0.0)
    predicted_ms = t.get("generate", 0.0)
    prompt_n, predicted_n = completion.prefill_new_tokens, completion.tokens_generated
    return {
        "index": 0,
        "content": texts[0] if texts else "",
        "candidates": texts,
        "id_slot": body.id_slot,
        "stop": True,
        "model": model_name,
        "tokens_predicted": predicted_n,
        "tokens_evaluated": completion.prefill_reused_tokens + prompt_n,
        "tokens_cached": completion.prefill_reused_tokens,
        "truncated": False,  # the prompt builder fits the context to its token budgets
        "stop_type": stop_type,
        "stopping_word": words[0] if words else "",
        "timings": {
            "cache_n": completion.prefill_reused_tokens,
            "prompt_n": prompt_n,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
            "prompt_per_second": 1000.0 * prompt_n / prompt_ms if prompt_ms else 0.0,
            "predicted_n": predicted_n,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
            "predicted_per_second": 1000.0 * predicted_n / predicted_ms if predicted_ms else 0.0,
        },
    }


def select_fields(response: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    """Only the named fields, as llama.cpp's response_fields: a nested one is named by its
    path (`timings/prompt_n`) and comes back under that flat name; absent ones are left out."""
    if not fields:
        return response
    out: dict[str, Any] = {}
    for name in fields:
        node: Any = response
        for part in name.split("/"):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            out[name] = node
    return out


def stream_events(response: dict[str, Any], fields: list[str]) -> list[dict[str, Any]]:
    """The answer as llama.cpp's stream: the content (not final), then the final record."""
    first = {"index": 0, "content": response["content"], "stop": False, "id_slot": response["id_slot"]}
    last = select_fields({**response, "content": ""}, fields)
    return [first, last]
