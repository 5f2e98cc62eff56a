"""The team server's pure parts: keys, request/answer conversion, the router's choice."""

from __future__ import annotations

import argparse
import random

import pytest

pytest.importorskip("ray.serve")

from codecomplete.request import Candidate, Completion  # noqa: E402
from codecomplete.serve import infill, native, openai  # noqa: E402
from codecomplete.serve.auth import ConcurrencyLimit, KeyRing, KeysFileError, parse_keys  # noqa: E402
from codecomplete.serve.cli import add_arguments, check_settings, parse_autoscale  # noqa: E402
from codecomplete.serve.common import ApiError, cut_at_stop, parse_body  # noqa: E402
from codecomplete.serve.router import any_replica, choose_for_session, entry_first, session_of  # noqa: E402


def test_keys_file_names_bare_keys_by_line_and_skips_comments():
    keys = parse_keys("# team\nalice:alice-key-0001\n\nbare-key-00002\n")
    assert [(k.name, k.secret) for k in keys] == [("alice", "alice-key-0001"), ("key4", "bare-key-00002")]
    assert "alice-key-0001" not in repr(keys)


@pytest.mark.parametrize("text", ["bob:short", "a:key-aaaaaaaa\na:key-bbbbbbbb", ":key-aaaaaaaa", "x:has space inside"])
def test_keys_file_refuses_short_repeated_or_unnamed_keys(text):
    with pytest.raises(KeysFileError, match="line"):
        parse_keys(text)


def test_keyring_names_the_key_and_refuses_others():
    ring = KeyRing(parse_keys("alice:alice-key-0001\nbob:bob-key-00002"))
    assert ring.identify("Bearer bob-key-00002") == "bob"
    assert ring.identify("bearer  alice-key-0001 ") == "alice"
    for header in (None, "", "Bearer", "Bearer alice", "Basic alice-key-0001", "Bearer alice-key-00012"):
        assert ring.identify(header) is None


def test_concurrency_limit_counts_per_key():
    limit = ConcurrencyLimit(2)
    assert limit.acquire("a") and limit.acquire("a") and not limit.acquire("a")
    assert limit.acquire("b")
    limit.release("a")
    assert limit.acquire("a") and limit.in_flight("a") == 2


def test_infill_cursor_prefix_is_input_prefix_plus_prompt():
    body = parse_body(infill.InfillRequest, {
        "input_prefix": "import os\n", "prompt": "os.path.jo", "input_suffix": "\nprint()\n",
        "input_extra": [{"filename": "util.py", "text": "def f(): pass\n"}], "n_predict": 0,
        "unknown_field": {"ignored": True}, "t_max_predict_ms": 250})
    request = infill.to_completion_request(body)
    assert request.prefix == "import os\nos.path.jo" and request.suffix == "\nprint()\n"
    assert [(n.path, n.text) for n in request.neighbours] == [("util.py", "def f(): pass\n")]
    assert request.options.max_new_tokens == 0 and request.options.deadline_ms == 250
    assert infill.to_completion_request(parse_body(infill.InfillRequest, {})).options.max_new_tokens == 48


@pytest.mark.parametrize("raw, field", [({"n_predict": 99999}, "n_predict"), ({"top_p": 2}, "top_p"),
                                        ({"input_prefix": 5}, "input_prefix"), ({"stop": ["x"] * 17}, "stop")])
def test_infill_out_of_range_fields_are_422_naming_the_field(raw, field):
    with pytest.raises(ApiError) as e:
        infill.to_completion_request(parse_body(infill.InfillRequest, raw))
    assert e.value.status == 422 and field in e.value.message


def _completion(*texts: str, stop_reason: str = "line") -> Completion:
    return Completion([Candidate(text=t, stop_reason=stop_reason) for t in texts],
                      {"prompt": 1.0, "prefill": 3.0, "generate": 8.0, "total": 12.5},
                      tokens_generated=4, prefill_reused_tokens=100, prefill_new_tokens=2)


def test_infill_answer_has_llamacpp_fields_and_our_candidates():
    body = parse_body(infill.InfillRequest, {"stop": [")"]})
    answer = infill.to_response(_completion("in(a, b)", "in(c)"), body, "m")
    assert answer["content"] == "in(a, b" and answer["candidates"] == ["in(a, b", "in(c"]
    assert answer["stop_type"] == "word" and answer["stopping_word"] == ")"
    assert answer["tokens_cached"] == 100 and answer["truncated"] is False
    assert answer["timings"]["prompt_n"] == 2 and answer["timings"]["prompt_ms"] == 4.0
    assert answer["timings"]["predicted_n"] == 4 and answer["timings"]["predicted_per_token_ms"] == 2.0


def test_response_fields_flatten_nested_names_and_skip_absent_ones():
    answer = infill.to_response(_completion("x"), parse_body(infill.InfillRequest, {}), "m")
    picked = infill.select_fields(answer, ["content", "timings/prompt_n", "timings/nothing", "nothing/deep"])
    assert picked == {"content": "x", "timings/prompt_n": 2}
    assert infill.select_fields(answer, []) is answer


def test_openai_answer_ranks_n_choices_with_finish_reasons():
    body = parse_body(openai.CompletionsRequest, {"prompt": "a", "suffix": "b", "n": 2, "stop": "\n"})
    request = openai.to_completion_request(body)
    assert (request.prefix, request.suffix, request.options.n) == ("a", "b", 4)  # drawn >= 4 for the reranker
    answer = openai.to_response(_completion("one\ntwo", "three", "four", stop_reason="max_tokens"), body, "m")
    assert [(c["text"], c["finish_reason"]) for c in answer["choices"]] == [("one", "stop"), ("three", "length")]
    assert answer["usage"] == {"prompt_tokens": 102, "completion_tokens": 4, "total_tokens": 106}
    chunks = openai.stream_chunks(answer)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop", "length"]


def test_openai_refuses_several_prompts():
    body = parse_body(openai.CompletionsRequest, {"prompt": ["a", "b"]})
    with pytest.raises(ApiError, match="one prompt"):
        openai.to_completion_request(body)


def test_session_keys_prefer_the_clients_and_stay_per_api_key():
    assert native.session_key({"session": "s1", "path": "a.py"}, "h", "alice") == "alice/h"
    assert native.session_key({"session": "s1", "path": "a.py"}, None, "alice") == "alice/s1"
    assert native.session_key({"path": "a.py"}, None, "bob") == "bob/a.py"
    with pytest.raises(ApiError):
        native.session_key({"session": 3}, None, "bob")
    same_window = [infill.session_key(parse_body(infill.InfillRequest, {"input_prefix": "def f():\n" + typed}), "a")
                   for typed in ("x", "xy")]
    assert same_window[0] == same_window[1]
    assert infill.session_key(parse_body(infill.InfillRequest, {"id_slot": 2}), "a") == "a/slot2/"


def test_api_errors_survive_pickling_between_replicas():
    import pickle

    again = pickle.loads(pickle.dumps(ApiError(503, "the model is loading", "service_unavailable")))
    assert (again.status, again.message, again.kind) == (503, "the model is loading", "service_unavailable")


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("a;b)c", [")", ";"]) == ("a", ";")
    assert cut_at_stop("abc", ["", "z"]) == ("abc", "")


def test_router_keeps_a_session_on_its_replica_until_it_is_overloaded():
    rng = random.Random(0)
    assert choose_for_session("r1", ["r1", "r2"], {"r1": 3, "r2": 0}, {}, 4, rng) == [["r1"], ["r2"]]
    assert choose_for_session("r1", ["r1", "r2"], {"r1": 5, "r2": 0}, {}, 4, rng) == [["r2"], ["r1"]]
    # the owner died (not a candidate): the least loaded
    assert choose_for_session("gone", ["r1", "r2"], {"r1": 2, "r2": None}, {}, 4, rng) == [["r2"], ["r1"]]


def test_router_sends_a_new_session_to_the_replica_with_fewer_sessions_on_a_tie():
    rng = random.Random(0)
    for _ in range(8):  # whatever order the two are drawn in
        assert choose_for_session(None, ["r1", "r2"], {}, {"r1": 3, "r2": 1}, 4, rng) == [["r2"], ["r1"]]
    ranks = choose_for_session(None, ["r1", "r2", "r3", "r4"], {}, {}, 4, rng)
    assert len(ranks) == 2 and all(len(rank) == 1 for rank in ranks)  # power of two choices
    drawn = {choose_for_session(None, ["r1", "r2"], {}, {}, 4, rng)[0][0] for _ in range(32)}
    assert drawn == {"r1", "r2"}  # a tie goes either way
    # a short wait on the replica owning more sessions does not outweigh them; overload does
    assert choose_for_session(None, ["r1", "r2"], {"r1": 1, "r2": 3}, {"r1": 4, "r2": 1}, 4, rng)[0] == ["r2"]
    assert choose_for_session(None, ["r1", "r2"], {"r1": 0, "r2": 6}, {"r1": 4, "r2": 1}, 4, rng)[0] == ["r1"]
    assert choose_for_session(None, [], {}, {}, 4, rng) == []


def test_router_sends_sessionless_http_to_one_entry_replica_whatever_the_order():
    rng = random.Random(0)
    for candidates in (["r2", "r1", "r3"], ["r3", "r2", "r1"], ["r1", "r3", "r2"]):
        assert entry_first(candidates, {"r1": 9, "r2": 0, "r3": 1}, rng) == [["r1"], ["r2"], ["r3"]]
    assert entry_first(["only"], {}, rng) == [["only"]] and entry_first([], {}, rng) == []


def test_router_sends_calls_of_no_session_to_any_replica():
    rng = random.Random(0)
    assert {any_replica(["r1", "r2"], {}, rng)[0][0] for _ in range(32)} == {"r1", "r2"}
    assert any_replica(["r1", "r2"], {"r1": 3, "r2": 0}, rng) == [["r2"], ["r1"]]


def test_router_reads_the_handed_on_session_before_the_proxys():
    from types import SimpleNamespace

    def pending(kwargs, session_id=""):
        return SimpleNamespace(kwargs=kwargs, metadata=SimpleNamespace(session_id=session_id))

    assert session_of(pending({"session": "alice/a.py"}, "header")) == "alice/a.py"
    assert session_of(pending({}, "header")) == "header"
    assert session_of(SimpleNamespace(kwargs={}, metadata=SimpleNamespace())) == ""  # an older Ray Serve
    assert session_of(None) == ""


def test_server_timing_header_parses_durations():
    from codecomplete.bench.serve import server_timing_ms

    timing = server_timing_ms("engine;dur=0.06, hand-on;dur=8.5, gateway;dur=9.1, body;dur=3.2, bad;dur=x, cache")
    assert timing == {"engine": 0.06, "hand-on": 8.5, "gateway": 9.1, "body": 3.2}


def _serve_args(*argv: str):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_serve_refuses_a_public_address_without_keys(tmp_path):
    with pytest.raises(SystemExit, match="without --api-keys"):
        check_settings(_serve_args("--host", "0.0.0.0"))
    keys = tmp_path / "keys"
    keys.write_text("team:team-key-000001\n")
    found, autoscale = check_settings(_serve_args("--host", "0.0.0.0", "--api-keys", str(keys), "--autoscale", "1:3"))
    assert [k.name for k in found] == ["team"] and autoscale == (1, 3)
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(SystemExit, match="holds no key"):
        check_settings(_serve_args("--api-keys", str(tmp_path / "empty")))
    with pytest.raises(SystemExit, match="MIN:MAX"):
        parse_autoscale("3")


def test_bench_users_type_at_different_places_of_the_file():
    from codecomplete.bench.serve import user_keystrokes

    text = "".join(f"line {i} = value_{i}\n" for i in range(200))
    starts = [user_keystrokes(text, u, 8, 20)[0] for u in range(8)]
    assert len(set(starts)) == 8 and min(starts) >= len(text) // 2
    start, suffix, offsets = user_keystrokes(text, 3, 8, 20)
    assert offsets == list(range(start + 1, start + 21)) and text.endswith(suffix)


def test_bench_serve_refuses_bad_variant_lists():
    from codecomplete.bench.serve import _values

    assert _values("--users", "1,4, 8") == [1, 4, 8]
    assert _values("--affinity", "on,off", ("on", "off")) == ["on", "off"]
    for flag, value, choices in (("--users", "0", None), ("--users", "a", None), ("--affinity", "maybe", ("on", "off"))):
        with pytest.raises(SystemExit, match="bench serve"):
            _values(flag, value, choices)


def test_ray_app_builder_takes_the_serve_settings_and_needs_keys(tmp_path):
    from ray.serve import Application

    from codecomplete.serve.cli import app_builder

    with pytest.raises(ValueError, match="api_keys"):
        app_builder({"replicas": "2"})
    keys = tmp_path / "keys"
    keys.write_text("team:team-key-000001\n")
    assert isinstance(app_builder({"api_keys": str(keys), "replicas": "2", "affinity": "off"}), Application)
    with pytest.raises(SystemExit, match="replicas"):
        app_builder({"api_keys": str(keys), "replicas": "0"})


def _engine_deployment(app):
    """The Gateway deployment of an application (each of its replicas holds an engine)."""
    return app._bound_deployment


def test_cuda_replicas_take_one_gpu_each_and_autoscale_on_ongoing_requests():
    from codecomplete.serve.app import build_app

    engine = _engine_deployment(build_app(device="cuda", runtime="torch", autoscale=(1, 4)))
    assert engine.ray_actor_options == {"num_cpus": 1, "num_gpus": 1}
    scaling = engine._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.initial_replicas, scaling.max_replicas) == (1, 1, 4)
    assert scaling.target_ongoing_requests == 2


def test_cpu_replicas_share_the_cores_out_and_keep_the_affinity_router(monkeypatch):
    from codecomplete.serve import cli
    from codecomplete.serve.app import build_app

    monkeypatch.setattr("codecomplete.runtime.onnx.physical_cores", lambda: 8)
    threads, cpus = cli.share_cpus("cpu", 4)
    assert (threads, cpus) == (2, 2.0)  # 4 replicas on 8 cores: 2 onnx threads and 2 Ray CPUs each
    assert cli.share_cpus("cuda", 4)[0] is None  # GPU replicas keep the runtime's own threads
    engine = _engine_deployment(build_app(replicas=4, threads=threads, replica_cpus=cpus))
    assert engine.ray_actor_options == {"num_cpus": 2.0} and engine._deployment_config.num_replicas == 4
    router = engine._deployment_config.request_router_config.request_router_class
    assert "SessionAffinityRouter" in str(router)
    plain = _engine_deployment(build_app(replicas=2, affinity=False))._deployment_config.request_router_config
    assert "SessionAffinityRouter" not in str(plain.request_router_class)
