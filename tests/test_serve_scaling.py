"""The team server across replicas: placement and autoscaling configuration (the config
objects Ray Serve gets, no GPU needed), and a real autoscaling run with CPU replicas of a
tiny model on the session's one local Ray (conftest.serve_port): under a load ramp the
deployment grows from one replica and shrinks back, no request is lost, sessions stay on
their replicas, and a session whose replica went away runs cold once elsewhere."""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time

import pytest

pytest.importorskip("ray.serve")

from ray import serve  # noqa: E402

from codecomplete.serve.app import (  # noqa: E402
    REPLICA_ONGOING_REQUESTS,
    Autoscaling,
    ServeSettings,
    build_app,
    wait_until_loaded,
)
from codecomplete.serve.cli import add_arguments, build_from_settings, check_settings  # noqa: E402

CLIENT_TIMEOUT_S = 25.0  # past the app's request timeout (15 s): a request that hangs is "lost"


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def _deployment(app):
    return app._bound_deployment  # the Deployment that serve.run gets


def test_cuda_replicas_each_ask_ray_for_one_gpu():
    app, _, _ = build_from_settings(_args("--replicas", "4", "--device", "cuda", "--runtime", "torch"))
    deployment = _deployment(app)
    assert deployment.ray_actor_options == {"num_cpus": 1, "num_gpus": 1}
    assert deployment.num_replicas == 4 and deployment._deployment_config.autoscaling_config is None
    engine_args, settings, _benchmark = deployment.init_args
    assert engine_args[2] == "cuda" and engine_args[-1] == "on"  # GPU replicas batch
    assert settings.hand_on  # several replicas: body sessions are handed on


def test_rerank_workers_reach_the_replicas_engine_and_bad_counts_are_refused():
    deployment = _deployment(build_from_settings(_args("--device", "cuda", "--runtime", "torch",
                                                       "--rerank-workers", "3"))[0])
    assert deployment.init_args[2] == {"rerank_workers": 3}
    default = _deployment(build_from_settings(_args("--device", "cuda", "--runtime", "torch"))[0])
    assert default.init_args[2] is None  # the Engine's own default (a few with batching)
    with pytest.raises(SystemExit, match="--rerank-workers"):
        build_from_settings(_args("--rerank-workers", "-1"))


def test_cpu_replicas_share_the_cores_without_gpus():
    deployment = _deployment(build_from_settings(_args("--replicas", "2"))[0])
    assert "num_gpus" not in deployment.ray_actor_options and deployment.ray_actor_options["num_cpus"] > 0
    assert deployment.num_replicas == 2


def test_autoscale_gives_ray_serve_a_config_on_ongoing_requests_with_sane_delays():
    app, _, autoscale = build_from_settings(_args("--autoscale", "1:4", "--device", "cuda", "--runtime", "torch"))
    deployment = _deployment(app)
    config = deployment._deployment_config.autoscaling_config
    assert autoscale == (1, 4) and deployment.ray_actor_options["num_gpus"] == 1
    assert (config.min_replicas, config.initial_replicas, config.max_replicas) == (1, 1, 4)
    # a batching GPU replica holds many requests at once; scaling up within seconds, down in minutes
    assert config.target_ongoing_requests == REPLICA_ONGOING_REQUESTS / 4
    assert 5 <= config.upscale_delay_s <= 60 and 60 <= config.downscale_delay_s <= 900
    assert config.upscale_delay_s < config.downscale_delay_s
    assert config.look_back_period_s > config.metrics_interval_s
    # a replica scaled down answers what it accepted before it goes
    assert deployment._deployment_config.graceful_shutdown_timeout_s > ServeSettings().request_timeout_s
    cpu = _deployment(build_from_settings(_args("--autoscale", "2:3"))[0])._deployment_config.autoscaling_config
    assert cpu.target_ongoing_requests == 2 and cpu.min_replicas == 2  # one running, one waiting


def test_autoscale_flags_reach_the_config_and_bad_ones_are_refused():
    app, _, _ = build_from_settings(_args("--autoscale", "1:3", "--target-ongoing-requests", "5",
                                          "--upscale-delay-s", "2", "--downscale-delay-s", "30"))
    config = _deployment(app)._deployment_config.autoscaling_config
    assert (config.target_ongoing_requests, config.upscale_delay_s, config.downscale_delay_s) == (5, 2, 30)
    for argv, message in [(["--target-ongoing-requests", "4"], "needs --autoscale"),
                          (["--autoscale", "1:2", "--target-ongoing-requests", "0"], "positive"),
                          (["--autoscale", "1:2", "--downscale-delay-s", "-1"], "at least 0"),
                          (["--autoscale", "3:2"], "MIN:MAX")]:
        with pytest.raises(SystemExit, match=message):
            check_settings(_args(*argv))
    with pytest.raises(ValueError, match="min_replicas"):
        Autoscaling(0, 2)


def test_router_forgets_the_sessions_of_replicas_that_went_away(monkeypatch):
    from types import SimpleNamespace

    from ray.serve.request_router import RequestRouter

    from codecomplete.serve.router import SessionAffinityRouter

    monkeypatch.setattr(RequestRouter, "update_replicas", lambda self, replicas: None)  # Ray's own bookkeeping
    router = SessionAffinityRouter.__new__(SessionAffinityRouter)
    router.initialize_state()

    def routed(session: str, replica: str) -> None:
        router.on_request_routed(SimpleNamespace(kwargs={"session": session}, metadata=None), replica, None)

    for session, replica in [("a", "r1"), ("b", "r1"), ("c", "r2")]:
        routed(session, replica)
    router.update_replicas([SimpleNamespace(replica_id="r2"), SimpleNamespace(replica_id="r3")])  # r1 scaled down
    assert dict(router._owners) == {"c": "r2"} and router._sessions_owned == {"r2": 1}


# -- a real autoscaling run -----------------------------------------------------------------

def _running_replicas() -> int:
    app = serve.status().applications.get("scale")
    return app.deployments["Gateway"].replica_states.get("RUNNING", 0) if app else 0


class Typist:
    """One session typing through its own document; every request is recorded, a hang as "lost"."""

    def __init__(self, port: int, name: str):
        self.port, self.name = port, name
        self.typed = 0
        self.records: list[dict] = []

    def keystroke(self) -> dict:
        self.typed += 1
        line = "    result = compute_total(values, weights, scale)\n"
        # the first line differs per session: no two share a prompt past its first tokens
        text = f"# {self.name}: its own file\ndef handler_{self.name}(values, weights):\n" + line[:4 + self.typed % 40]
        body = json.dumps({"text": text, "offset": len(text), "path": f"{self.name}.py", "language": "python",
                           "options": {"n": 2, "max_new_tokens": 6}}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=CLIENT_TIMEOUT_S)
        t0 = time.monotonic()
        try:
            conn.request("POST", "/scale/v1/engine/complete", body=body,
                         headers={"Content-Type": "application/json", "X-Session-Id": self.name})
            response = conn.getresponse()
            answer = json.loads(response.read() or b"{}")
            record = {"status": response.status, "replica": answer.get("replica"),
                      "new_tokens": answer.get("prefill_new_tokens")}
        except (OSError, http.client.HTTPException, ValueError) as e:  # a timeout: the request hung
            record = {"status": "lost", "error": type(e).__name__}
        finally:
            conn.close()
        record.update(session=self.name, t0=t0, ms=(time.monotonic() - t0) * 1000)
        self.records.append(record)
        return record


def _type_until(typists: list[Typist], stop: threading.Event, pause_s: float) -> list[threading.Thread]:
    def loop(t: Typist) -> None:
        while not stop.is_set():
            t.keystroke()
            stop.wait(pause_s)
    threads = [threading.Thread(target=loop, args=(t,), daemon=True) for t in typists]
    for thread in threads:
        thread.start()
    return threads


def _wait(condition, timeout_s: float, what: str, timeline: list) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout_s:g} s; replicas over time: {timeline}"
        time.sleep(0.25)


def _stays(records: list[dict]) -> tuple[int, int]:
    """(requests answered by the session's previous replica, requests with a previous answer)."""
    answered = [r for r in records if r["status"] == 200]
    same = sum(a["replica"] == b["replica"] for a, b in zip(answered, answered[1:], strict=False))
    return same, max(0, len(answered) - 1)


OWN_KV_MAX_NEW_TOKENS = 8  # a keystroke on the replica holding its KV prefills the typed end only


@pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")
def test_autoscaling_grows_under_a_ramp_shrinks_after_and_loses_no_request(serve_port, tiny_model_dir):
    # small delays for the test; each replica a quarter CPU, one onnx thread
    scaling = Autoscaling(1, 3, target_ongoing_requests=1, upscale_delay_s=1.0, downscale_delay_s=3.0,
                          look_back_period_s=1.0, metrics_interval_s=0.25)
    serve._run(build_app(str(tiny_model_dir), autoscale=scaling, threads=1, replica_cpus=0.25,
                         settings=ServeSettings(request_timeout_s=15.0)),
               name="scale", route_prefix="/scale", _blocking=False)
    timeline: list[tuple[float, int]] = []
    watching = threading.Event()

    def watch() -> None:  # the replica count over time, as a client reads it (GET /v1/replicas)
        t0 = time.monotonic()
        while not watching.wait(0.5):
            conn = http.client.HTTPConnection("127.0.0.1", serve_port, timeout=CLIENT_TIMEOUT_S)
            try:
                conn.request("GET", "/scale/v1/replicas")
                answer = json.loads(conn.getresponse().read())
                timeline.append((round(time.monotonic() - t0, 1), answer["running"]))
            except (OSError, http.client.HTTPException, ValueError, KeyError):  # busy: the next sample
                pass
            finally:
                conn.close()

    typists = [Typist(serve_port, f"s{k}") for k in range(6)]
    threads: list[threading.Thread] = []
    ramping, calm = threading.Event(), threading.Event()
    try:
        _wait(lambda: _running_replicas() >= 1, 120, "the first replica ran", timeline)
        wait_until_loaded("scale", 1, timeout_s=120)
        threading.Thread(target=watch, daemon=True).start()
        # the ramp: a typist joins every second, each sending keystrokes back to back
        for typist in typists:
            threads += _type_until([typist], ramping, 0.0)
            time.sleep(1.0)
        answering = lambda: {r["replica"] for t in typists for r in t.records[-3:] if r["status"] == 200}  # noqa: E731
        _wait(lambda: len(answering()) >= 2, 90, "a second replica answered", timeline)
        time.sleep(3.0)  # the sessions settle on the replicas
        ramping.set()
        for thread in threads:
            thread.join(timeout=2 * CLIENT_TIMEOUT_S)
        up = [r for t in typists for r in t.records]
        # the calm: two typists on different replicas type slowly until one replica is left
        last = {t.name: next(r["replica"] for r in reversed(t.records) if r["status"] == 200) for t in typists}
        calm_typists = [typists[0], next(t for t in typists if last[t.name] != last[typists[0].name])]
        marks = {t.name: len(t.records) for t in calm_typists}
        threads = _type_until(calm_typists, calm, 0.4)
        _wait(lambda: _running_replicas() == 1 and timeline and timeline[-1][1] == 1, 60,
              "back down to one replica", timeline)
        time.sleep(2.5)  # a few keystrokes on the replica left
        calm.set()
        for thread in threads:
            thread.join(timeout=2 * CLIENT_TIMEOUT_S)
    finally:
        ramping.set()
        calm.set()
        watching.set()
        serve.delete("scale")
    everything = [r for t in typists for r in t.records]
    statuses = [r["status"] for r in everything]
    assert "lost" not in statuses and set(statuses) <= {200, 429, 503}, [r for r in everything if r["status"] != 200]
    assert statuses.count(200) >= 0.95 * len(statuses)
    assert max(n for _, n in timeline) >= 2 and timeline[-1][1] == 1, timeline
    # affinity across scaling: most keystrokes land on the replica that served the session last
    stays = [_stays([r for r in up if r["session"] == t.name]) for t in typists]
    same, pairs = sum(s for s, _ in stays), sum(p for _, p in stays)
    assert pairs > 0 and same >= 0.8 * pairs, (same, pairs)
    for typist in typists:  # and find their KV there
        rows = [r for r in up if r["session"] == typist.name and r["status"] == 200]
        warm = [now["new_tokens"] <= OWN_KV_MAX_NEW_TOKENS for before, now in zip(rows, rows[1:], strict=False)
                if now["replica"] == before["replica"]]
        assert all(warm), (typist.name, rows)
    moved = 0
    for typist in calm_typists:
        answered = [r for r in typist.records if r["status"] == 200]
        start = next(i for i, r in enumerate(answered) if r["t0"] >= typist.records[marks[typist.name]]["t0"])
        for k in range(max(1, start), len(answered)):
            before, now = answered[k - 1], answered[k]
            if now["replica"] == before["replica"]:  # warm on the replica that kept its KV
                assert now["new_tokens"] <= OWN_KV_MAX_NEW_TOKENS, answered[start:]
                continue
            moved += 1  # its replica went away: answered by another, cold there once, unless
            # that one still holds the session's KV from an earlier visit
            if now["replica"] not in {r["replica"] for r in answered[:k]}:
                assert now["new_tokens"] > OWN_KV_MAX_NEW_TOKENS, answered[start:]
    assert moved >= 1  # two replicas' sessions met on the one left


def test_random_7b_replicas_need_the_torch_runtime():
    from codecomplete.serve.replica_engine import random_7b_runtime

    with pytest.raises(ValueError, match="--runtime torch"):
        random_7b_runtime("onnx", "cuda", "auto")


def test_the_entry_replica_stays_when_a_replica_with_a_lower_id_is_added():
    import random

    from codecomplete.serve.router import entry_first

    rng = random.Random(0)
    assert entry_first(["r5", "r2"], {}, rng)[0] == ["r2"]  # a router's first pick: the lowest id
    assert entry_first(["r5", "r2", "r1"], {}, rng, current="r2")[0] == ["r2"]  # r1 added: r2 stays
    assert entry_first(["r5", "r1"], {}, rng, current="r2")[0] == ["r1"]  # r2 gone: the lowest again
