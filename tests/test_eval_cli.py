"""`codecomplete eval ...` end to end on a tiny hand-made data folder, with a fake engine."""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json

import pytest

from codecomplete.eval import cli as eval_cli
from codecomplete.eval.data import DataError, resolve_data_dir
from codecomplete.request import Candidate, Completion

PROBLEM = {
    "task_id": "Hand/1", "entry_point": "inc", "language": "python",
    "prompt": "\n\ndef inc(x):\n    \"\"\"x plus one.\"\"\"\n    return x +",
    "canonical_solution": " 1\n",
    "test": "\n\ndef check(candidate):\n    assert candidate(1) == 2\n",
}


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "data"
    split = root / "tokenalign" / "perturbed_mbxp_v2" / "mbpp" / "word"
    split.mkdir(parents=True)
    # the fake engine's " 1" is wrong here: by the tests and by the first line
    wrong = {**PROBLEM, "task_id": "Hand/2", "prompt": PROBLEM["prompt"].replace("x +", "x -"), "canonical_solution": " (-1)\n"}
    (split / "mbpp_word_sub_filter.jsonl").write_text("\n".join(json.dumps(r) for r in (PROBLEM, wrong)) + "\n")
    infill_dir = root / "human-eval-infilling"
    infill_dir.mkdir()
    record = {"task_id": "Hand/inf", "entry_point": "inc", "prompt": "def inc(x):\n", "suffix": "    return y\n",
              "canonical_solution": "    y = x + 1\n", "test": PROBLEM["test"]}
    with gzip.open(infill_dir / "HumanEval-SingleLineInfilling.jsonl.gz", "wt") as f:
        f.write(json.dumps(record) + "\n")
    mx = root / "mxeval" / "multilingual_humaneval"
    mx.mkdir(parents=True)
    (mx / "metadata.json").write_text(json.dumps({"python": "he.jsonl", "go": "he_go.jsonl"}))
    (mx / "he.jsonl").write_text(json.dumps({**PROBLEM, "prompt": "def inc(x):\n", "canonical_solution": "    return x + 1\n"}) + "\n")
    return root


class FakeEngine:
    """Answers ' 1' (right for the first problem, wrong for the second) and counts 3 tokens."""

    def complete(self, request):
        text = " 1\n" if request.prefix.endswith("x +") else ("    y = x + 1\n" if "y" in request.suffix else " 1\n")
        return Completion([Candidate(text=text)], tokens_generated=3, model_calls=1)

    def describe(self):
        return {"name": "fake"}


def run_cli(argv, monkeypatch, engine=None) -> int:
    monkeypatch.setattr(eval_cli, "_engine", lambda args, cases: engine or FakeEngine())
    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_tokenalign_json_has_benchmark_settings_cases_and_metrics(data_dir, monkeypatch, capsys):
    code = run_cli(["eval", "tokenalign", "--data-dir", str(data_dir), "--json", "--no-progress"], monkeypatch)
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["benchmark"] == "tokenalign/python/word/sub"
    assert result["cases"] == 2 and result["pass@1"] == 0.5 and result["exact_match"] == 0.5
    assert result["tokens_generated"] == 6 and result["model_calls"] == 2
    assert result["settings"]["options"]["multiline"] is True and result["settings"]["engine"] == {"name": "fake"}
    assert "process_limit" in result["settings"]["sandbox"]


def test_infill_and_mxeval_run_from_the_cli(data_dir, monkeypatch, capsys):
    assert run_cli(["eval", "infill", "--data-dir", str(data_dir), "--json", "--no-progress"], monkeypatch) == 0
    assert json.loads(capsys.readouterr().out)["pass@1"] == 1.0
    assert run_cli(["eval", "mxeval", "--lang", "python", "--data-dir", str(data_dir), "--json", "--no-progress"], monkeypatch) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["benchmark"] == "mxeval/humaneval/python" and result["cases"] == 1


def test_mxeval_skips_a_language_without_toolchain_with_a_clear_message(data_dir, monkeypatch, capsys):
    monkeypatch.setattr(eval_cli, "missing_binaries", lambda lang: ["go"])
    code = run_cli(["eval", "mxeval", "--lang", "go", "--data-dir", str(data_dir), "--json"], monkeypatch)
    out, err = capsys.readouterr()
    assert code == 0 and "go toolchain not installed" in err and json.loads(out)["skipped"]


def test_baseline_for_a_language_without_full_files_is_a_clear_error(data_dir, monkeypatch, capsys):
    code = run_cli(["eval", "tokenalign", "--lang", "java", "--baseline", "--data-dir", str(data_dir)], monkeypatch)
    assert code == eval_cli.EXIT_DATA_ERROR and "Python only" in capsys.readouterr().err


def test_lines_report_writes_markdown_and_json(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "m.py").write_text("def f(a):\n    return a + 1\n")
    report = tmp_path / "report"
    code = run_cli(["eval", "lines", str(src), "--cursor", "line-start", "--json", "--no-progress", "--report", str(report)], monkeypatch)
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["benchmark"] == "lines/line-start" and result["cases"] == 2
    assert {"exact_match", "edit_similarity", "syntax_error_rate", "oracle_exact_match", "latency_p50_ms"} <= set(result)
    assert (report / "report.md").read_text().startswith("# lines/line-start")
    assert json.loads((report / "results.json").read_text())["cases"] == 2
    if importlib.util.find_spec("matplotlib") is not None:
        assert (report / "metrics.png").stat().st_size > 0 and "![metrics.png]" in (report / "report.md").read_text()


def test_data_dir_comes_from_the_flag_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CODECOMPLETE_DATA", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    with pytest.raises(DataError):
        resolve_data_dir(str(tmp_path / "missing"))
