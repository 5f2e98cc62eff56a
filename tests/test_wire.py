"""The engine's request and answer as JSON (the team server and the remote client share it)."""

import json

import pytest

from codecomplete.request import (
    Candidate,
    Completion,
    CompletionOptions,
    CompletionRequest,
    Neighbour,
)
from codecomplete.wire import (
    WireError,
    completion_from_json,
    completion_to_json,
    request_from_json,
    request_to_json,
)


def test_a_request_survives_the_round_trip_through_json():
    req = CompletionRequest(text="import os\nos.path.jo", offset=20, language="python", path="app/main.py",
                            neighbours=[Neighbour("app/util.py", "def f(): pass\n", "python")],
                            options=CompletionOptions(n=2, max_new_tokens=16, multiline=False, patience_steps=None))
    back = request_from_json(json.loads(json.dumps(request_to_json(req))))
    assert (back.text, back.offset, back.language, back.path) == (req.text, req.offset, req.language, req.path)
    assert back.neighbours == req.neighbours
    assert back.options == req.options


def test_a_completion_survives_the_round_trip_and_keeps_its_source():
    done = Completion([Candidate("in(", score=1.5, logprob=-0.2, tokens=2, stop_reason="eos")], {"total": 12.5},
                      tokens_generated=7, model_calls=3, prefill_reused_tokens=40, prefill_new_tokens=2)
    back = completion_from_json(json.loads(json.dumps(completion_to_json(done))))
    assert [c.text for c in back.candidates] == ["in("]
    assert back.candidates[0].score == 1.5 and back.source == "warm" and back.model_calls == 3


@pytest.mark.parametrize("raw, field", [
    ({"text": 3}, "text"),
    ({"text": "abc", "offset": 9}, "offset"),
    ({"text": "abc", "offset": 1.5}, "offset"),
    ({"text": "a", "options": {"n": 0}}, "options.n"),
    ({"text": "a", "options": {"temperature": "hot"}}, "options.temperature"),
    ({"text": "a", "options": {"rerank": 1}}, "options.rerank"),
    ({"text": "a", "neighbours": [{"path": 1}]}, "neighbours[0].path"),
    ([1, 2], "object"),
])
def test_malformed_requests_name_the_field(raw, field):
    with pytest.raises(WireError, match=field.replace("[", r"\[").replace("]", r"\]")):
        request_from_json(raw)


def test_unknown_keys_are_ignored_and_the_cursor_defaults_to_the_end():
    req = request_from_json({"text": "abc", "future_field": 1, "options": {"n": 3, "new_option": True}})
    assert req.offset == 3 and req.options.n == 3
