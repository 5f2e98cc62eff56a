"""`bench serve`'s scaling figures (efficiency per replica count, the issue's ratios at the
load where one replica's p95 doubles), its kept-KV count, and its refusals; the server
itself is exercised by tests/test_serve_scaling.py."""

from __future__ import annotations

import argparse

import pytest

from codecomplete.bench import serve as bench_serve


def _row(replicas, users, ks, p95, kept=1.0, warm=1.0):
    return {"replicas": replicas, "affinity": "server's", "users": users, "keystrokes_per_s": ks, "p95_ms": p95,
            "kept_kv_share": kept, "warm_share": warm}


def test_scaling_efficiency_is_against_r_times_one_replica_at_the_same_users():
    rows = [_row(1, 8, 10.0, 100), _row(1, 32, 20.0, 400), _row(2, 8, 12.0, 90), _row(2, 32, 36.0, 150),
            _row(4, 64, 70.0, 200), _row("server's", 8, 5.0, 100)]
    bench_serve.add_scaling_efficiency(rows)
    assert [r["scaling_efficiency"] for r in rows] == [1.0, 1.0, 0.6, 0.9, None, None]


def test_scaling_summary_reads_the_issues_ratios_at_the_load_where_p95_doubles():
    rows = [_row(1, 8, 10.0, 100), _row(1, 32, 20.0, 250, kept=0.9), _row(1, 128, 22.0, 2000),
            _row(4, 32, 70.0, 120, kept=0.81), _row(4, 128, 76.0, 290)]
    summary = bench_serve.scaling_summary(rows)
    assert summary["p95_doubles_at_users"] == 32 and summary["lightest_p95_ms"] == 100
    (four,) = summary["replicas"]
    assert four["replicas"] == 4 and four["at_users"] == 32
    assert four["keystrokes_per_s_ratio_same_users"] == pytest.approx(3.5)
    assert four["keystrokes_per_s_ratio_scaled_users"] == pytest.approx(3.8)  # 4x the typists
    assert four["p95_ratio_scaled_users"] == pytest.approx(1.16)
    assert four["kept_kv_share_ratio"] == pytest.approx(0.9)
    assert bench_serve.scaling_summary([_row(2, 8, 1.0, 1)]) is None  # no one-replica rows


def test_kept_kv_counts_only_keystrokes_that_found_their_own_prompt():
    assert bench_serve.kept_kv({"source": "cache", "new_tokens": 0, "reused_tokens": 0})
    assert bench_serve.kept_kv({"source": "warm", "new_tokens": 3, "reused_tokens": 900})
    # "warm" by one shared leading token: another document's state, all else prefilled
    assert not bench_serve.kept_kv({"source": "warm", "new_tokens": 900, "reused_tokens": 2})
    assert not bench_serve.kept_kv({"source": "cold", "new_tokens": 900, "reused_tokens": 0})


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench_serve.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("argv, message", [
    (["--url", "http://127.0.0.1:9", "--replicas", "1,2"], "--serve-command"),
    (["--url", "http://127.0.0.1:9", "--serve-command", "codecomplete serve --port {port}"], "needs --replicas"),
    (["--autoscale-ramp"], "need --url"),
    (["--url", "http://127.0.0.1:9", "--lost-after-s", "0"], "positive"),
])
def test_bench_serve_refuses_rows_it_cannot_make(argv, message):
    with pytest.raises(SystemExit, match=message):
        bench_serve.run(_args(*argv))


def test_a_server_that_never_gets_ready_stops_the_bench_with_its_output(tmp_path):
    script = tmp_path / "server.py"
    script.write_text("import sys\nprint('codecomplete serve: cannot bind port', file=sys.stderr)\nsys.exit(3)\n")
    import sys

    with pytest.raises(SystemExit, match="cannot bind port"):
        with bench_serve.ServerProcess(f"{sys.executable} {script} --replicas {{replicas}}", 2, 9):
            pass
