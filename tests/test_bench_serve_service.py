"""`codecomplete bench serve --device cpu --url ...`: the in-process typists and the same
typists through a team server in exact mode (one replica on the tests' shared Ray), side
by side, answering alike token for token."""

from __future__ import annotations

import argparse
import json
import time

import pytest

pytest.importorskip("ray.serve")
torch = pytest.importorskip("torch")

from ray import serve  # noqa: E402

from codecomplete.bench import serve as bench_serve  # noqa: E402
from codecomplete.serve.app import build_app, wait_until_loaded  # noqa: E402
from codecomplete.serve.cli import add_arguments as serve_arguments  # noqa: E402
from codecomplete.serve.cli import check_settings  # noqa: E402

APP, PREFIX = "bench-service", "/bench-service"
NEW_TOKENS = 5


def _args(*argv: str):
    p = argparse.ArgumentParser()
    bench_serve.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.fixture(scope="module")
def exact_server(serve_port, tiny_model_dir):
    """One torch replica of the tiny model, batching off, decoding exactly NEW_TOKENS."""
    serve._run(build_app(str(tiny_model_dir), runtime="torch", replicas=1, threads=1, replica_cpus=0.5,
                         exact_new_tokens=NEW_TOKENS), name=APP, route_prefix=PREFIX, _blocking=False)
    try:
        deadline = time.monotonic() + 120
        while serve.status().applications[APP].status != "RUNNING":
            assert time.monotonic() < deadline, serve.status()
            time.sleep(0.3)
        wait_until_loaded(APP, 1, timeout_s=deadline - time.monotonic())
        yield f"http://127.0.0.1:{serve_port}{PREFIX}"
    finally:
        serve.delete(APP)


def _bench(url: str, model_dir, variants: str, new_tokens: int, capsys) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the replica's one thread: the same float sums
    try:
        code = bench_serve.run(_args(
            "--device", "cpu", "--model", str(model_dir), "--url", url, "--variants", variants, "--users", "1,2",
            "--keystrokes", "3", "--interval-ms", "20", "--pause-ms", "10", "--n", "2",
            "--new-tokens", str(new_tokens), "--context-tokens", "160", "--copy-gbps", "10", "--max-row-s", "10",
            "--json"))
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return json.loads(capsys.readouterr().out)


def test_the_service_variant_answers_the_same_typists_as_in_process(exact_server, tiny_model_dir, capsys):
    result = _bench(exact_server, tiny_model_dir, "sequential,service", NEW_TOKENS, capsys)
    rows = result["rows"]
    assert [(r["variant"], r["users"]) for r in rows] == [("sequential", 1), ("sequential", 2), ("service", 1),
                                                         ("service", 2)]
    assert result["url"] == exact_server
    for r in rows:
        assert r["errors"] == 0 and r["keystrokes"] >= 1 and r["p95_ms"] >= r["p50_ms"] > 0
        assert r["keystrokes_per_s"] > 0 and "records" not in r
    for r in rows[2:]:
        assert r["in_process_variant"] == "sequential" and r["paired_keystrokes"] == r["keystrokes"]
        assert r["p50_vs_in_process"] > 0 and r["p95_vs_in_process"] > 0 and r["paired_ratio_p50"] > 0
        # greedy decoding of the same prompts, exactly NEW_TOKENS each: the same candidates
        assert r["same_answers_share"] == 1.0


def test_the_service_variant_refuses_a_server_that_does_not_decode_exactly(exact_server, tiny_model_dir, capsys):
    with pytest.raises(SystemExit, match="--exact-new-tokens 7"):
        _bench(exact_server, tiny_model_dir, "service", 7, capsys)


def test_the_service_variant_and_url_go_together(tiny_model_dir):
    with pytest.raises(SystemExit, match="go together"):
        bench_serve.run(_args("--device", "cpu", "--variants", "sequential,service"))
    with pytest.raises(SystemExit, match="go together"):
        bench_serve.run(_args("--device", "cpu", "--url", "http://127.0.0.1:9", "--variants", "sequential"))


def test_serve_takes_exact_new_tokens_for_benchmarks_only_when_asked():
    p = argparse.ArgumentParser()
    serve_arguments(p)
    assert p.parse_args([]).exact_new_tokens == 0
    with pytest.raises(SystemExit, match="--exact-new-tokens"):
        check_settings(p.parse_args(["--exact-new-tokens", "-1"]))
    bound = build_app(runtime="torch", exact_new_tokens=16)._bound_deployment.init_args
    assert bound[2] == {"exact_new_tokens": 16}
    assert build_app()._bound_deployment.init_args[2] is None


def test_a_random_7b_replica_decodes_exactly_when_asked(monkeypatch, tiny_model_dir):
    """`serve --model random-7b --exact-new-tokens 16`: the 7B-shaped model (a tiny runtime
    stands in for the 15 GB one), every keystroke decoding exactly 16 tokens."""
    from codecomplete.runtime import load_runtime
    from codecomplete.serve import app, replica_engine

    built = []

    def standin(runtime, device, precision):
        built.append((runtime, device, precision))
        return load_runtime(str(tiny_model_dir), runtime="torch")

    class Context:
        class replica_id:  # noqa: N801 (the shape of Ray's replica context)
            unique_id = "replica-under-test"

    monkeypatch.setattr(replica_engine, "random_7b_runtime", standin)
    monkeypatch.setattr(app.serve, "get_replica_context", lambda: Context)
    replica = app.EngineReplica("random-7b", "torch", "cpu", "auto", 1, "off", exact_new_tokens=16)
    assert built == [("torch", "cpu", "auto")]
    assert replica.engine.exact_new_tokens == 16 and not replica.engine.reuse_keystrokes
    normal = app.EngineReplica(str(tiny_model_dir), "torch", "cpu", "auto", 1)
    assert normal.engine.exact_new_tokens is None and normal.engine.reuse_keystrokes
