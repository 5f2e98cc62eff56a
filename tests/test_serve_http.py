"""The team server over HTTP on one local Ray instance: the API shapes, affinity routing,
errors and limits, cancellation, and a replica killed mid-run.

The session's one Ray instance (conftest.serve_port) and two applications serve the whole
module (starting them is most of its time): /aff (two replicas, affinity routing, API
keys, one request in flight per key) and /rr (two replicas, power of two choices, no keys).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import signal
import socket
import threading
import time

import pytest

pytest.importorskip("ray.serve")

from ray import serve  # noqa: E402

from codecomplete.request import CompletionOptions, CompletionRequest  # noqa: E402
from codecomplete.serve.app import ServeSettings, build_app, wait_until_loaded  # noqa: E402
from codecomplete.serve.auth import parse_keys  # noqa: E402
from codecomplete.wire import completion_from_json, request_to_json  # noqa: E402

ALICE, BOB = "alice-key-000000001", "bob-key-0000000002"
TIMEOUT_S = 40.0  # every client call is bounded: a hang fails the test instead of stalling it


@pytest.fixture(scope="module")
def server(serve_port):
    # four replicas share two CPUs, one onnx thread each; both applications start at once
    common = dict(replicas=2, threads=1, replica_cpus=0.5)
    keys = ServeSettings(keys=tuple(parse_keys(f"alice:{ALICE}\nbob:{BOB}")), per_key_concurrency=1)
    serve._run(build_app(affinity=True, settings=keys, **common), name="aff", route_prefix="/aff", _blocking=False)
    serve._run(build_app(affinity=False, **common), name="rr", route_prefix="/rr", _blocking=False)
    try:
        deadline = time.monotonic() + 180
        while any(serve.status().applications[app].status != "RUNNING" for app in ("aff", "rr")):
            assert time.monotonic() < deadline, serve.status()
            time.sleep(0.5)
        for app in ("aff", "rr"):
            wait_until_loaded(app, 2, timeout_s=deadline - time.monotonic())
        yield serve_port
    finally:
        serve.delete("aff")
        serve.delete("rr")


def call(port: int, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    """(status, headers, parsed JSON or text) of one request (with alice's key unless the
    headers name another)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", "Authorization": f"Bearer {ALICE}",
                                                     **(headers or {})})
        response = conn.getresponse()
        text = response.read().decode()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return response.status, {k.lower(): v for k, v in response.getheaders()}, parsed
    finally:
        conn.close()


MID_TOKEN = "import os\n\n\ndef data_file(name):\n    return os.path.jo"


@pytest.fixture(scope="module")
def engine():
    from codecomplete.engine import Engine

    return Engine.load()


def _engine_top(engine, prefix: str, suffix: str = "", **options) -> str:
    engine.forget()
    c = engine.complete(CompletionRequest(text=prefix + suffix, offset=len(prefix),
                                          options=CompletionOptions(**options)))
    return c.candidates[0].text


def test_infill_returns_the_engines_top_candidate_for_a_mid_token_cursor(server, engine):
    prefix, typed = MID_TOKEN[:-2], MID_TOKEN[-2:]  # llama.vim sends the cursor line's text as prompt
    status, headers, answer = call(server, "POST", "/aff/infill",
                                   {"input_prefix": prefix, "prompt": typed, "input_suffix": "\n", "n_predict": 16,
                                    "t_max_predict_ms": 10000})
    assert status == 200, answer
    assert answer["content"].startswith("in(")
    assert answer["content"] == _engine_top(engine, MID_TOKEN, "\n", max_new_tokens=16, deadline_ms=10000)
    assert answer["candidates"][0] == answer["content"] and answer["stop"] is True
    assert headers["x-codecomplete-replica"] and headers["x-codecomplete-warm"] in ("0", "1")


def test_openai_completions_return_the_engines_top_candidate_first(server, engine):
    status, headers, answer = call(server, "POST", "/aff/v1/completions",
                                   {"model": "codecomplete-default", "prompt": MID_TOKEN, "suffix": "\n",
                                    "max_tokens": 16, "n": 2, "user": "openai-test"})
    assert status == 200, answer
    texts = [c["text"] for c in answer["choices"]]
    assert len(texts) == 2 and texts[0].startswith("in(")
    assert texts[0] == _engine_top(engine, MID_TOKEN, "\n", max_new_tokens=16)
    assert answer["object"] == "text_completion" and answer["usage"]["completion_tokens"] > 0


def test_streams_end_with_their_final_event(server):
    status, headers, text = call(server, "POST", "/aff/v1/completions", {"prompt": MID_TOKEN, "stream": True})
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]" and json.loads(events[0])["choices"][0]["text"].startswith("in(")
    status, _, text = call(server, "POST", "/aff/infill", {"input_prefix": MID_TOKEN, "stream": True})
    finals = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert status == 200 and finals[0]["content"].startswith("in(") and finals[-1]["stop"] is True


def test_infill_response_fields_come_back_flattened(server):
    fields = ["content", "timings/prompt_n", "timings/predicted_ms", "tokens_cached", "truncated"]
    status, _, answer = call(server, "POST", "/aff/infill",
                             {"input_prefix": MID_TOKEN, "response_fields": fields, "id_slot": 0})
    assert status == 200 and sorted(answer) == sorted(fields)
    assert isinstance(answer["timings/prompt_n"], int) and answer["content"].startswith("in(")


def test_native_endpoint_speaks_the_wire_shape_and_names_the_replica(server):
    request = CompletionRequest(text=MID_TOKEN, offset=len(MID_TOKEN), language="python", path="native.py",
                                options=CompletionOptions(max_new_tokens=16))
    status, headers, answer = call(server, "POST", "/aff/v1/engine/complete",
                                   {**request_to_json(request), "session": "native"})
    assert status == 200, answer
    assert answer["replica"] == headers["x-codecomplete-replica"]
    completion = completion_from_json(answer)
    assert completion.candidates[0].text.startswith("in(")
    assert headers["x-codecomplete-warm"] == ("1" if answer["source"] in ("warm", "cache") else "0")


def test_health_and_models(server):
    status, headers, answer = call(server, "GET", "/aff/health")
    assert status == 200 and answer["status"] == "ok" and answer["replica"]
    status, _, answer = call(server, "GET", "/aff/v1/models")
    assert status == 200 and answer["data"][0]["id"] == "codecomplete-default"
    assert call(server, "GET", "/aff/health", headers={"Authorization": ""})[0] == 200  # no key needed


def _type_alternately(port: int, prefix: str, sessions: list[str], keystrokes: int) -> dict[str, list[tuple[str, str]]]:
    """Each session types through its own document, in turn: (replica, source) per request."""
    seen: dict[str, list[tuple[str, str]]] = {s: [] for s in sessions}
    line = "    total = compute_total(values, weights)\n"
    for k in range(keystrokes):
        for s in sessions:
            doc = f"# {s}: a different document per session\nimport os\n\n\ndef handler_{s}(values, weights):\n"
            text = doc + line[: 8 + k]
            request = CompletionRequest(text=text, offset=len(text), language="python", path=f"{s}.py",
                                        options=CompletionOptions(max_new_tokens=8, n=2))
            status, headers, answer = call(port, "POST", f"{prefix}/v1/engine/complete", request_to_json(request),
                                           {"X-Session-Id": s})
            assert status == 200, answer
            assert "hand-on" not in headers["server-timing"]  # the proxy routed it: one hop
            seen[s].append((headers["x-codecomplete-replica"], answer["source"]))
    return seen


def test_affinity_keeps_each_session_on_its_replica_and_warm(server):
    sessions = ["ana", "ben"]
    seen = _type_alternately(server, "/aff", sessions, keystrokes=6)
    replicas = {s: {r for r, _ in seen[s]} for s in sessions}
    assert all(len(r) == 1 for r in replicas.values()), replicas
    assert replicas["ana"] != replicas["ben"]  # a new session goes to the replica with fewer sessions
    assert all(source != "cold" for s in sessions for _, source in seen[s][1:]), seen


def test_sessions_named_only_in_the_body_are_handed_on_and_keep_their_replica(server):
    """llama.vim sends no session header: the entry replica hands each request on by the
    session it reads from the body (the first line of the window)."""
    seen: dict[str, list[tuple[str, str]]] = {"eve": [], "fay": []}
    for k in range(5):
        for name in seen:
            window = f"# {name}'s file\nimport os\n\n\ndef load_{name}(path):\n    return os.path.jo"
            status, headers, answer = call(server, "POST", "/aff/infill",
                                           {"input_prefix": window, "prompt": "in"[:k % 3], "n_predict": 6})
            assert status == 200, answer
            assert "hand-on;dur=" in headers["server-timing"] and "engine;dur=" in headers["server-timing"]
            seen[name].append((headers["x-codecomplete-replica"], headers["x-codecomplete-warm"]))
    assert all(len({r for r, _ in rows}) == 1 for rows in seen.values()), seen
    assert all(warm == "1" for rows in seen.values() for _, warm in rows[1:]), seen


def test_without_affinity_sessions_wander_between_replicas(server):
    sessions = ["cat", "dan"]
    seen = _type_alternately(server, "/rr", sessions, keystrokes=8)
    assert any(len({r for r, _ in seen[s]}) > 1 for s in sessions), seen


def test_auth_body_limit_json_and_range_errors_leave_the_server_answering(server):
    ok_body = {"input_prefix": "x = 1\n", "n_predict": 4}
    status, _, answer = call(server, "POST", "/aff/infill", ok_body, {"Authorization": ""})
    assert status == 401 and answer["error"]["type"] == "authentication_error"
    assert call(server, "POST", "/aff/infill", ok_body, {"Authorization": "Bearer wrong-key-00000"})[0] == 401
    assert call(server, "GET", "/aff/v1/models", headers={"Authorization": ""})[0] == 401
    auth = {"Authorization": f"Bearer {ALICE}"}
    big = json.dumps({"input_prefix": "x" * (4 * 1024 * 1024 + 10)}).encode()
    status, _, answer = call(server, "POST", "/aff/infill", headers=auth, raw=big)
    assert status == 413 and "bytes" in answer["error"]["message"]
    status, _, answer = call(server, "POST", "/aff/infill", headers=auth, raw=b'{"input_prefix": "x",')
    assert status == 400 and "malformed JSON" in answer["error"]["message"]
    status, _, answer = call(server, "POST", "/aff/infill", {"n_predict": 100000}, auth)
    assert status == 422 and "n_predict" in answer["error"]["message"]
    status, _, answer = call(server, "POST", "/aff/v1/engine/complete",
                             {"text": "abc", "offset": 9}, auth)
    assert status == 422 and "offset" in answer["error"]["message"]
    status, _, answer = call(server, "POST", "/aff/v1/engine/complete",
                             {"text": "abc", "options": {"n": 99}}, auth)
    assert status == 422 and "options.n" in answer["error"]["message"]
    status, _, answer = call(server, "POST", "/aff/infill", ok_body, auth)
    assert status == 200 and "content" in answer


# inside a string literal the decode runs to its deadline (a function body's block ends within
# a second or two at temperature 5, which is too soon for the tests that cut it off)
SLOW = {"text": 'STORY = """\n', "offset": 12, "path": "slow.py",
        "options": {"max_new_tokens": 1024, "multiline": True, "deadline_ms": 6000, "temperature": 5.0,
                    "patience_steps": None, "n": 8}}


def test_per_key_concurrency_limit_is_429_for_that_key_only(server):
    alice, bob = {"Authorization": f"Bearer {ALICE}"}, {"Authorization": f"Bearer {BOB}"}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(call, server, "POST", "/aff/v1/engine/complete", SLOW, alice)
        time.sleep(1.0)
        status, _, answer = call(server, "POST", "/aff/infill", {"input_prefix": "x = ", "n_predict": 2}, alice)
        assert status == 429 and answer["error"]["type"] == "rate_limit_exceeded"
        assert call(server, "GET", "/aff/v1/models", headers=bob)[0] == 200
        assert slow.result(timeout=TIMEOUT_S)[0] == 200
    assert call(server, "POST", "/aff/infill", {"input_prefix": "x = ", "n_predict": 2}, alice)[0] == 200


def _replicas(app: str) -> dict[str, dict]:
    """Each replica's describe()."""
    return {info["replica"]: info for info in wait_until_loaded(app, 2, timeout_s=TIMEOUT_S)}


def _cancelled() -> int:
    return sum(info["cancelled_requests"] for info in _replicas("aff").values())


def _path_served_by(port: int, entry_replica: bool) -> str:
    """A file path whose session (no header: handed on by the entry replica) lives on the
    entry replica itself, or on the other one."""
    entry = call(port, "GET", "/aff/health")[2]["replica"]
    for k in range(40):
        path = f"{'entry' if entry_replica else 'other'}-{k}.py"
        status, headers, answer = call(port, "POST", "/aff/v1/engine/complete",
                                       {"text": "x = ", "path": path, "options": {"max_new_tokens": 1}},
                                       {"Authorization": f"Bearer {BOB}"})
        assert status == 200, answer
        if (headers["x-codecomplete-replica"] == entry) == entry_replica:
            return path
    raise AssertionError("no session landed there")


@pytest.mark.parametrize("entry_replica", [True, False], ids=["on-the-entry-replica", "handed-on"])
def test_client_disconnect_cancels_the_engine_call(server, entry_replica):
    path = _path_served_by(server, entry_replica)
    before = _cancelled()
    sock = socket.create_connection(("127.0.0.1", server), timeout=TIMEOUT_S)
    deadline_s = 15.0
    body = json.dumps({**SLOW, "path": path, "options": {**SLOW["options"], "deadline_ms": deadline_s * 1000}}).encode()
    sent = time.perf_counter()
    sock.sendall(b"POST /aff/v1/engine/complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {BOB}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    time.sleep(1.5)  # decoding has begun
    sock.close()
    deadline = time.monotonic() + 10
    while _cancelled() == before:
        assert time.monotonic() < deadline, "the replica never saw the cancellation"
        time.sleep(0.1)
    # the engine thread stopped decoding: the session's next request does not wait for the deadline
    status, _, _ = call(server, "POST", "/aff/v1/engine/complete", {"text": "y = ", "path": path,
                                                                   "options": {"max_new_tokens": 2}},
                        {"Authorization": f"Bearer {BOB}"})
    assert status == 200 and time.perf_counter() - sent < deadline_s - 3.0


def test_killing_a_replica_mid_run_the_next_requests_are_answered(server):
    victim = next(iter(_replicas("aff").values()))["pid"]
    results: list[int] = []

    def keep_typing(n: int) -> None:
        for k in range(n):
            text = f"import os\nvalue_{k} = os.path.jo"
            results.append(call(server, "POST", "/aff/infill",
                                {"input_prefix": text, "n_predict": 8}, {"X-Session-Id": f"k{k % 3}"})[0])

    typist = threading.Thread(target=keep_typing, args=(6,))
    typist.start()
    time.sleep(0.3)
    os.kill(victim, signal.SIGKILL)
    typist.join(timeout=6 * TIMEOUT_S)
    assert not typist.is_alive() and len(results) == 6  # none hung
    after = [call(server, "POST", "/aff/infill", {"input_prefix": f"x{k} = os.path.jo", "n_predict": 4})[0]
             for k in range(4)]
    assert after == [200] * 4, (results, after)
    deadline = time.monotonic() + 90  # Ray Serve starts a replacement
    while serve.status().applications["aff"].deployments["Gateway"].replica_states.get("RUNNING", 0) < 2:
        assert time.monotonic() < deadline, serve.status().applications["aff"].deployments["Gateway"]
        time.sleep(0.5)


def test_a_replica_whose_engine_does_not_load_answers_503_with_the_reason(server):
    serve._run(build_app(model="/nonexistent/model-folder", replica_cpus=0), name="broken",
               route_prefix="/broken", _blocking=False)
    try:
        with pytest.raises(RuntimeError, match="failed to (load|start)"):  # what `codecomplete serve` reports
            wait_until_loaded("broken", 1, timeout_s=60)
        deadline = time.monotonic() + 60
        while True:  # Ray Serve replaces the unhealthy replica again and again: ask while one runs
            conn = http.client.HTTPConnection("127.0.0.1", server, timeout=2)
            try:
                conn.request("POST", "/broken/infill", body=b'{"input_prefix": "x = "}',
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                status, text = response.status, response.read()
                if status == 503 and not text.startswith(b"{"):
                    # the proxy's own answer: no replica runs. Under load a replacement's engine
                    # can fail before Ray Serve's first health check of it, which then counts as
                    # a failed start; after three, Ray Serve stops replacing it (DEPLOY_FAILED)
                    # and answers for it. The reason is then in its status
                    app = serve.status().applications["broken"]
                    if app.status == "DEPLOY_FAILED":
                        reason = " ".join(d.message for d in app.deployments.values())
                        assert "failed to load" in reason or "health check" in reason, reason
                        break
                    raise TimeoutError
                reason = json.loads(text)["error"]["message"]
                assert "failed to load (ModelLoadError)" in reason, reason
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "no replica of the broken application answered"
                time.sleep(0.2)
            finally:
                conn.close()
        assert status == 503, (status, text)
    finally:
        serve.delete("broken")
