"""bench host: the real engine and scheduler over a free stand-in runtime report the host's
cost per request-step for each variant, and every variant decodes the same steps."""

from __future__ import annotations

import argparse
import json

import numpy as np

from codecomplete.bench import host


def test_every_variant_reports_its_host_cost_over_the_same_steps(capsys):
    p = argparse.ArgumentParser()
    host.add_arguments(p)
    args = p.parse_args(["--vocab", "16384", "--users", "1,2", "--keystrokes", "2", "--new-tokens", "4",
                         "--context-tokens", "128", "--rounds", "1", "--json"])
    assert host.run(args) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert {(r["variant"], r["users"]) for r in rows} == {(v, u) for v in host.VARIANTS for u in (1, 2)}
    for r in rows:
        assert r["keystrokes"] == 2 * r["users"]
        assert r["request_steps_per_keystroke"] == 3  # the first token comes from the prompt's logits
        assert r["host_us_per_request_step"] > 0 and r["host_cpu_us_per_request_step"] > 0
        assert set(r["stage_ms"]) >= {"prompt", "generate", "rerank"}
        assert r["rerank_workers"] == (1 if r["variant"] == "batched-top-pool" else 0)
        if not r["variant"].startswith("sequential"):
            assert r["scheduler_busy_us_per_request_step"] > 0
            assert r["scheduler_cpu_us_per_request_step"] > 0 and "keystrokes_per_s_vs_sequential" in r
            assert r["picks_cpu_max_ms"] >= r["picks_cpu_p99_ms"] >= 0


def test_flat_rows_are_every_token_drawn_alike():
    """--rows flat: the stand-in's rows as random weights give them (no few tokens far above
    the rest), what bench serve's random-7b decodes."""
    peaked = host.stand_in(16384, 128, 4, 0)._logits
    flat = host.stand_in(16384, 128, 4, 0, rows="flat")._logits
    spread = lambda rows: float(np.median(rows.max(axis=1) - np.median(rows, axis=1)))  # noqa: E731
    assert spread(peaked) > 25 > 12 > spread(flat)
    try:
        host.stand_in(16384, 128, 4, 0, rows="spiky")
    except ValueError as e:
        assert "spiky" in str(e)
    else:
        raise AssertionError("an unknown row shape was taken")


def test_a_bad_variant_is_a_clear_error():
    p = argparse.ArgumentParser()
    host.add_arguments(p)
    try:
        host.run(p.parse_args(["--variants", "sequential,fastest"]))
    except SystemExit as e:
        assert "fastest" in str(e)
    else:
        raise AssertionError("an unknown variant ran")
