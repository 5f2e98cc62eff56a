"""Each benchmark scores a right and a wrong completion correctly (fake engine, hand-made problems)."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable

import pytest

from codecomplete.eval import infill, lines, mxeval, tokenalign
from codecomplete.eval.runner import ReferenceEngine, run_execution_benchmark
from codecomplete.request import Candidate, Completion, CompletionOptions, CompletionRequest


class FakeEngine:
    """Same interface as codecomplete.engine.Engine: answers from a function of the request."""

    def __init__(self, answer: Callable[[CompletionRequest], list[str]], tokens_per_candidate: int = 5):
        self.answer = answer
        self.tokens_per_candidate = tokens_per_candidate
        self.requests: list[CompletionRequest] = []

    def complete(self, request: CompletionRequest) -> Completion:
        self.requests.append(request)
        texts = self.answer(request)
        return Completion(
            candidates=[Candidate(text=t, tokens=self.tokens_per_candidate) for t in texts],
            tokens_generated=self.tokens_per_candidate * len(texts), model_calls=1, timings_ms={"total": 1.0},
        )


def by_prefix_end(table: dict[str, list[str]]) -> Callable[[CompletionRequest], list[str]]:
    """Answer by the last line of the prefix (each hand-made problem's is unique)."""
    return lambda request: table[request.prefix.rsplit("\n", 1)[-1] or request.prefix.rstrip("\n").rsplit("\n", 1)[-1]]


OPTIONS = CompletionOptions(n=1, multiline=True, max_new_tokens=64, deadline_ms=10_000)

ADD_TEST = "\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
INFILL_RECORDS = [
    {"task_id": "Hand/add/L1", "entry_point": "add", "prompt": "def add(a, b):\n    total = a\n",
     "suffix": "    return total\n", "canonical_solution": "    total += b\n", "test": ADD_TEST},
    {"task_id": "Hand/add/L1-wrong", "entry_point": "add", "prompt": "def add(a, b):\n    result = a\n",
     "suffix": "    return result\n", "canonical_solution": "    result += b\n", "test": ADD_TEST},
]


def test_infill_passes_the_right_middle_and_fails_the_wrong_one():
    cases = [infill.case_for(r, OPTIONS, whole_lines=True) for r in INFILL_RECORDS]
    # right: the canonical middle without its newline (the harness restores it); wrong: b subtracted
    engine = FakeEngine(by_prefix_end({"    total = a": ["    total += b"], "    result = a": ["    result -= b\n"]}))
    metrics, details = run_execution_benchmark(engine, cases, infill.program_of, show_progress=False)
    assert [d["passed"] for d in details] == [True, False]
    assert metrics["pass@1"] == pytest.approx(0.5)
    assert metrics["tokens_generated"] == 10 and metrics["model_calls"] == 2
    request = engine.requests[0]
    assert request.prefix == INFILL_RECORDS[0]["prompt"] and request.suffix == INFILL_RECORDS[0]["suffix"]


def test_infill_program_is_prompt_candidate_and_the_whole_suffix():
    case = infill.case_for({**INFILL_RECORDS[0], "suffix": "    return total\n"}, OPTIONS)
    source = infill.program_source(case, Candidate(text="    total += b\n"))
    assert "    total += b\n    return total\n" in source


TA_PY = {
    "task_id": "Hand/py/1", "entry_point": "double_all", "language": "python",
    "prompt": "\n\ndef double_all(items):\n    \"\"\"Double every item.\"\"\"\n    return [2 * x for x i",
    "canonical_solution": "n items]\n",
    "test": "\n\ndef check(candidate):\n    assert candidate([1, 2]) == [2, 4]\n",
}


def test_tokenalign_python_scores_execution_and_first_line_exact_match():
    cases = [tokenalign.case_for(TA_PY, "python", OPTIONS), tokenalign.case_for({**TA_PY, "task_id": "Hand/py/2"}, "python", OPTIONS)]
    answers = iter([["n items]\n\n\ndef unused():\n    pass\n"], ["n range(items)]\n"]])
    engine = FakeEngine(lambda request: next(answers))
    metrics, details = run_execution_benchmark(engine, cases, tokenalign.program_of, show_progress=False,
                                               extra_case_fields=tokenalign.exact_match_fields)
    assert [(d["passed"], d["exact_match"]) for d in details] == [(True, True), (False, False)]
    assert cases[0].request.offset == len(TA_PY["prompt"]) and cases[0].request.suffix == ""


TA_JS = {
    "task_id": "Hand/js/1", "entry_point": "sumOf", "language": "javascript",
    "prompt": "function sumOf(xs) {\n  return xs.red",
    "canonical_solution": "uce((a, b) => a + b, 0);\n}",
    "test": "\nconst _ = require(\"lodash\")\nif (!_.isEqual(sumOf([1, 2, 3]), 6)) { throw 'bad'; }\n"
            "if (!_.isEqual(_.chunk([1, 2, 3], 2), [[1, 2], [3]])) { throw 'chunk'; }\n",
}


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_tokenalign_javascript_right_and_wrong_with_the_lodash_shim():
    cases = [tokenalign.case_for(TA_JS, "javascript", OPTIONS), tokenalign.case_for({**TA_JS, "task_id": "Hand/js/2"}, "javascript", OPTIONS)]
    answers = iter([["uce((a, b) => a + b, 0);\n}\nsumOf([])"], ["uce((a, b) => a - b, 0);\n}"]])
    engine = FakeEngine(lambda request: next(answers))
    metrics, details = run_execution_benchmark(engine, cases, tokenalign.program_of, show_progress=False,
                                               extra_case_fields=tokenalign.exact_match_fields)
    assert [(d["passed"], d["exact_match"]) for d in details] == [(True, True), (False, False)], details


TA_JAVA = {
    "task_id": "Hand/java/1", "entry_point": "twice", "language": "java",
    "prompt": "import java.util.*;\n\nclass Twice {\n    public static int twice(int x) {\n        ret",
    "canonical_solution": "urn 2 * x;\n    }\n}",
    "test": "\n\nclass Main {\n    public static void main(String[] args) throws Exception {\n"
            "        if (Twice.twice(4) != 8) throw new Exception(\"bad\");\n    }\n}\n",
}


@pytest.mark.skipif(shutil.which("javac") is None or shutil.which("java") is None, reason="no JDK")
def test_tokenalign_java_compiles_and_runs_right_and_wrong():
    cases = [tokenalign.case_for(TA_JAVA, "java", OPTIONS), tokenalign.case_for({**TA_JAVA, "task_id": "Hand/java/2"}, "java", OPTIONS)]
    answers = iter([["urn 2 * x;\n    }\n}\n\nclass Trailing {}\n"], ["urn x * x;\n    }\n}"]])
    engine = FakeEngine(lambda request: next(answers))
    _, details = run_execution_benchmark(engine, cases, tokenalign.program_of, show_progress=False,
                                         extra_case_fields=tokenalign.exact_match_fields)
    assert [(d["passed"], d["exact_match"]) for d in details] == [(True, True), (False, False)], details


MX_PY = {
    "task_id": "Hand/mx/1", "entry_point": "is_even", "language": "python",
    "prompt": "def is_even(n):\n    \"\"\"True for even n.\"\"\"\n",
    "canonical_solution": "    return n % 2 == 0\n",
    "test": "\n\ndef check(candidate):\n    assert candidate(4)\n    assert not candidate(3)\n",
}


def test_mxeval_pass_at_k_over_samples_and_top1_from_the_ranking():
    case = mxeval.case_for(MX_PY, "python", CompletionOptions(n=3))
    wrong, right = "    return n % 2 == 1\n", "    return n % 2 == 0\n"
    engine = FakeEngine(lambda request: [wrong, right, wrong])
    metrics, details = run_execution_benchmark(engine, [case], mxeval.program_of, samples=3, show_progress=False)
    assert metrics["pass@1"] == 0.0  # the top-ranked candidate is wrong
    assert metrics["pass@1_sampled"] == pytest.approx(1 / 3)
    assert metrics["pass@2"] == pytest.approx(2 / 3)
    assert details[0]["candidates"] == 3 and details[0]["candidates_passed"] == 1


def test_reference_engine_answers_with_the_canonical_solution():
    case = mxeval.case_for(MX_PY, "python", OPTIONS)
    metrics, _ = run_execution_benchmark(ReferenceEngine([case]), [case], mxeval.program_of, show_progress=False)
    assert metrics["pass@1"] == 1.0 and metrics["tokens_generated"] == 0


def test_engine_errors_count_as_misses_and_are_reported():
    def broken(request):
        raise RuntimeError("boom")

    case = mxeval.case_for(MX_PY, "python", OPTIONS)
    metrics, details = run_execution_benchmark(FakeEngine(broken), [case], mxeval.program_of, show_progress=False)
    assert metrics["pass@1"] == 0.0 and metrics["engine_errors"] == 1 and "boom" in details[0]["engine_error"]


SOURCE = "def area(width, height):\n    result = width * height\n    return result\n"


def test_cursor_kinds_land_where_they_say():
    rng = random.Random(0)
    starts = lines.cursor_positions(SOURCE, "line-start", rng)
    assert [SOURCE[p:p + 6] for p in starts] == ["def ar", "result", "return"]
    word = set("abcdefghijklmnopqrstuvwxyz_")
    for p in lines.cursor_positions(SOURCE, "mid-token", rng):
        assert SOURCE[p - 1] in word and SOURCE[p] in word
    for p in lines.cursor_positions(SOURCE, "boundary", rng):
        assert not (SOURCE[p - 1].isalnum() and SOURCE[p].isalnum()) and SOURCE[p:SOURCE.find("\n", p)].strip()


def test_line_case_removes_the_rest_of_the_line_and_keeps_the_following_lines():
    offset = SOURCE.index("* height")
    case = lines.make_case(SOURCE, offset, "area.py", "python", OPTIONS)
    assert case.reference == "* height"
    assert case.request.prefix.endswith("result = width ") and case.request.suffix.startswith("\n    return result")


def test_lines_scores_exact_match_edit_similarity_syntax_and_the_oracle():
    offset = SOURCE.index("* height")
    case = lines.make_case(SOURCE, offset, "area.py", "python", OPTIONS)
    answers = iter([["* height"], ["* (height", "* height"], ["+ heigth"]])
    metrics, details = lines.evaluate(FakeEngine(lambda r: next(answers)), [case, case, case], show_progress=False)
    assert [d["exact_match"] for d in details] == [True, False, False]
    assert [d["oracle_exact_match"] for d in details] == [True, True, False]
    assert [d["syntax_error"] for d in details] == [False, True, False]
    assert details[2]["edit_similarity"] == pytest.approx(1 - 3 / 8)
    assert metrics["exact_match"] == pytest.approx(1 / 3) and metrics["oracle_exact_match"] == pytest.approx(2 / 3)
    assert metrics["syntax_error_rate"] == pytest.approx(1 / 3)
    assert metrics["tokens_generated"] == 20 and "latency_p50_ms" in metrics


def test_lines_walks_directories_and_skips_unknown_extensions(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text(SOURCE)
    (tmp_path / "pkg" / "notes.txt").write_text("not code\n")
    (tmp_path / "pkg" / ".git").mkdir()
    (tmp_path / "pkg" / ".git" / "b.py").write_text(SOURCE)
    cases = lines.load_cases([str(tmp_path / "pkg")], "line-start", OPTIONS, per_file=2, seed=1)
    assert len(cases) == 2 and all(c.request.path == "pkg/a.py" for c in cases)
    again = lines.load_cases([str(tmp_path / "pkg")], "line-start", OPTIONS, per_file=2, seed=1)
    assert [c.request.offset for c in cases] == [c.request.offset for c in again]


def test_a_line_opening_a_multiline_string_is_no_syntax_error_when_completed_right():
    source = 'def f():\n    s = """\n    text\n    """\n    return s\n'
    case = lines.make_case(source, source.index('"""'), "f.py", "python", OPTIONS)
    answers = iter([['"""'], ["(("]])
    _, details = lines.evaluate(FakeEngine(lambda r: next(answers)), [case, case], show_progress=False)
    assert [d["syntax_error"] for d in details] == [False, True]
