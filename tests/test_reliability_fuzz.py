"""Hostile input fuzz: thousands of malformed messages into one real server process (fake engine).

Every request with a valid id must be answered (a result or a JSON-RPC error), the process
must stay up, stdout must carry only framed JSON, and a valid request afterwards must get
the right answer. The message count is printed as a JSON line (see it with -s).
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from codecomplete.bench.soak import RawServer, frame

ENV = {**os.environ, "CODECOMPLETE_FAKE_STEP_MS": "0.2"}
FAKE = ["--engine-factory", "codecomplete.lsp.testing:fake_engine", "--log-level", "ERROR"]
URI = "file:///project/main.py"
CTX = {"triggerKind": 1}
METHODS = ["textDocument/inlineCompletion", "textDocument/completion", "textDocument/didOpen",
           "textDocument/didChange", "textDocument/didClose", "workspace/didChangeConfiguration",
           "textDocument/hover", "codecomplete/unknown", "$/setTrace", "", "initialized"]
COUNT = {"messages": 0, "requests": 0}

json_scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
positions = st.fixed_dictionaries({"line": st.integers(-5, 10**6) | json_values,
                                   "character": st.integers(-5, 10**6) | json_values})
uris = st.sampled_from([URI, "file:///never/opened.py", "", "not a uri", "file:///%00"]) | st.text(max_size=30)
completion_params = st.fixed_dictionaries({
    "textDocument": st.fixed_dictionaries({"uri": uris}) | json_values,
    "position": positions | json_values,
}, optional={"context": st.fixed_dictionaries({"triggerKind": st.integers(-1, 3) | json_values})})
open_params = st.fixed_dictionaries({"textDocument": st.fixed_dictionaries({
    "uri": uris, "languageId": st.sampled_from(["python", "klingon", "", "c"]) | json_values,
    "version": st.integers(-3, 5) | json_values,
    "text": st.text(max_size=200) | st.just("\x00\x01\x02binary\x00") | json_values})})
params = completion_params | open_params | json_values


@st.composite
def message(draw) -> tuple[bytes, object]:
    """(framed bytes, the id an answer is owed to or None)."""
    kind = draw(st.integers(0, 9))
    if kind == 0:  # not JSON, or invalid UTF-8
        return frame(draw(st.binary(min_size=1, max_size=200))), None
    if kind == 1:  # JSON that is not a JSON-RPC object
        return frame(json.dumps(draw(json_values)).encode()), None
    method = draw(st.sampled_from(METHODS) | st.text(max_size=20).filter(lambda m: m not in ("exit", "shutdown", "initialize")))
    body: dict = {"jsonrpc": draw(st.sampled_from(["2.0", "2.0", "2.0", "1.0"]) | json_values), "method": method}
    if draw(st.booleans()):
        body["params"] = draw(params)
    owed = None
    if kind >= 5:  # a request: with a good id it must be answered
        COUNT["requests"] += 1
        msg_id = COUNT["requests"] + 10_000
        body["id"] = msg_id if kind != 9 else draw(json_values)
        owed = body["id"] if isinstance(body["id"], int) and not isinstance(body["id"], bool) and kind != 9 else None
    return frame(json.dumps(body).encode()), owed


@pytest.fixture(scope="module")
def server():
    srv = RawServer(FAKE, env=ENV)
    assert srv.initialize(timeout_s=60) == "ready"
    srv.notify("textDocument/didOpen", {"textDocument": {"uri": URI, "languageId": "python", "version": 1,
                                                         "text": "def show(value):\n    pri\n"}})
    yield srv
    code = srv.close()
    print(json.dumps({"fuzz_messages": COUNT["messages"], "fuzz_requests_answered": COUNT["requests"],
                      "crashes": 0 if code == 0 else 1}))
    assert code == 0, "".join(srv.stderr_lines[-20:])
    assert not srv.stdout_garbage


def assert_valid_request_answered(srv: RawServer, msg_id) -> None:
    uri = "file:///project/final.py"  # the fuzz may have closed or rewritten URI
    srv.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1,
                                                         "text": "def show(value):\n    pri\n"}})
    srv.request(msg_id, "textDocument/inlineCompletion",
                {"textDocument": {"uri": uri}, "position": {"line": 1, "character": 7}, "context": CTX})
    answer = srv.response(msg_id, timeout_s=15)
    assert answer is not None, "the server hung"
    assert answer["result"]["items"][0]["insertText"] == "nt(value)"


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          phases=[Phase.generate])  # no shrinking: the server is shared, and a hang would cost minutes
@given(batch=st.lists(message(), min_size=5, max_size=50))
def test_hostile_messages_are_answered_and_the_server_lives(server, batch):
    owed = []
    data = b""
    for raw, msg_id in batch:
        data += raw
        if msg_id is not None:
            owed.append(msg_id)
    server.write(data)
    COUNT["messages"] += len(batch)
    assert server.wait_for(lambda: all(i in server.responses for i in owed), 10.0), \
        f"unanswered: {[i for i in owed if i not in server.responses]}"
    for i in owed:
        answer = server.responses[i][1]
        assert "result" in answer or answer["error"]["code"] in (-32602, -32601, -32600, -32603, -32800), answer
    assert server.proc.poll() is None


def test_huge_binary_and_out_of_range_then_a_valid_request(server):
    own = "file:///project/ranges.py"  # the fuzz may have closed or rewritten URI
    server.notify("textDocument/didOpen", {"textDocument": {"uri": own, "languageId": "python", "version": 1,
                                                            "text": "def show(value):\n    pri\n"}})
    huge = "x = 1\n" * (10 * 1024 * 1024 // 6)  # 10 MB
    server.notify("textDocument/didOpen", {"textDocument": {"uri": "file:///huge.py", "languageId": "python",
                                                            "version": 1, "text": huge}})
    server.request("huge", "textDocument/inlineCompletion",
                   {"textDocument": {"uri": "file:///huge.py"}, "position": {"line": 5, "character": 0}, "context": CTX})
    server.write(frame(b"\xff\xfe\x00garbage\xc3\x28"))
    server.request("past", "textDocument/inlineCompletion",
                   {"textDocument": {"uri": own}, "position": {"line": 99, "character": 0}, "context": CTX})
    server.request("neg", "textDocument/inlineCompletion",
                   {"textDocument": {"uri": own}, "position": {"line": -1, "character": -3}, "context": CTX})
    server.request("unknown", "codecomplete/noSuchMethod", {})
    server.request("closed", "textDocument/completion",
                   {"textDocument": {"uri": "file:///never.py"}, "position": {"line": 0, "character": 0}})
    COUNT["messages"] += 6
    huge_answer = server.response("huge", 30)
    assert huge_answer.get("result", {}).get("items") == [], huge_answer
    assert server.response("past")["error"]["code"] == -32602
    assert server.response("neg")["error"]["code"] == -32602
    assert server.response("unknown")["error"]["code"] == -32601
    assert server.response("closed")["result"]["items"] == []
    assert_valid_request_answered(server, "final")
