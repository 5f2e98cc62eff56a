"""The scorers, pinned on hand-made cases."""

from __future__ import annotations

import math

import pytest

from codecomplete.eval.metrics import (
    edit_similarity,
    first_line,
    levenshtein,
    pass_at_k,
    pass_at_k_summary,
    same_first_line,
    same_line,
)
from codecomplete.eval.programs import truncate_braces, truncate_python


def test_pass_at_k_matches_the_combinatorial_definition():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (5, 0, 2), (5, 5, 3), (20, 1, 10)]:
        expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_1_is_the_fraction_correct_and_k_beyond_n_uses_all():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(3, 1, 10) == 1.0
    assert pass_at_k(3, 0, 10) == 0.0


def test_pass_at_k_summary_stops_at_the_largest_sample_count():
    summary = pass_at_k_summary([[True, False, False], [False, False, False]])
    assert set(summary) == {"pass@1", "pass@2"}
    assert summary["pass@1"] == pytest.approx((1 / 3 + 0) / 2)
    assert summary["pass@2"] == pytest.approx((2 / 3 + 0) / 2)


def test_edit_similarity_is_one_for_equal_and_scales_with_distance():
    assert levenshtein("kitten", "sitting") == 3
    assert edit_similarity("abc", "abc") == 1.0
    assert edit_similarity("", "") == 1.0
    assert edit_similarity("abcd", "abcx") == pytest.approx(0.75)
    assert edit_similarity("abc", "") == 0.0


def test_first_line_keeps_leading_blank_lines_and_drops_trailing_spaces():
    assert first_line("n range(C)] \n\tfor i") == "n range(C)]"
    assert first_line("\n  \n  res = 1\n  return res") == "\n  \n  res = 1"
    assert same_first_line("n range(C)]\nwhatever", "n range(C)] \n\ttc[0][0] = 1")
    assert not same_first_line("n range(R)]", "n range(C)]")


def test_same_line_compares_only_the_first_generated_line():
    assert same_line("value)\n    more", "value)  ")
    assert not same_line("values)", "value)")


def test_python_truncation_keeps_helpers_and_stops_at_top_level_code():
    prompt = "def f(x):\n    return g(x)\n"
    completion = "\n\ndef g(x):\n    s = \"\"\"\nprint('in a string')\n\"\"\"\n    return x\n\n\nprint(f(1))\nassert f(2) == 2\n"
    assert truncate_python(prompt, completion) == "\n\ndef g(x):\n    s = \"\"\"\nprint('in a string')\n\"\"\"\n    return x\n\n\n"
    assert truncate_python("def f():\n", "    return 1\nif __name__ == '__main__':\n    f()") == "    return 1\n"


def test_python_truncation_drops_a_helper_cut_off_at_the_token_limit():
    prompt = "def f(x):\n"
    assert truncate_python(prompt, "    return x\n\ndef h(y):\n    return (y +") == "    return x\n\n"


def test_brace_truncation_closes_what_the_prompt_opened_ignoring_strings_and_comments():
    prompt = "class A {\n    static int f(int x) {\n        String s = \"}\";\n"
    completion = "        // } not this\n        return x; /* } */\n    }\n}\nclass Extra {}\n"
    assert truncate_braces(prompt, completion, "java") == "        // } not this\n        return x; /* } */\n    }\n}"
    js_prompt = "function f(a) {\n  const t = `${a}}`;\n"
    assert truncate_braces(js_prompt, "  return t;\n}\nconsole.log(1)", "javascript") == "  return t;\n}"
    assert truncate_braces("function f() {\n", "  return 1;\n", "javascript") == "  return 1;\n"
