import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from codecomplete.languages import language_for
from codecomplete.lexer import code_part, scan_brackets
from codecomplete.postprocess import clean_candidates, cut_repetition, drop_suffix_overlap
from codecomplete.request import Candidate, StopReason
from codecomplete.scope import decide_scope

PY = language_for("python")
JS = language_for("javascript")
GO = language_for("go")
RUST = language_for("rust")


# ---------------------------------------------------------------- scope


def test_python_empty_block_start_is_multiline():
    scope = decide_scope("def f(x):\n    ", "\n\ndef g():\n    pass\n", PY)
    assert scope.multiline
    assert scope.base_indent == "    "


def test_python_cursor_at_end_of_block_header_is_multiline_one_level_deeper():
    scope = decide_scope("class A:\n  def f(self):", "\n", PY)
    assert scope.multiline
    assert scope.base_indent == "    "


def test_python_mid_line_is_single_line():
    scope = decide_scope("def f(x):\n    y = foo(", ")\n", PY)
    assert not scope.multiline


def test_open_paren_at_line_end_is_single_line_but_the_line_below_is_a_block():
    assert not decide_scope("x = foo(", "\n", PY).multiline
    scope = decide_scope("x = foo(\n    ", "\n", PY)
    assert scope.multiline and not scope.suffix_closes_block
    assert scope.stop_index("a,\n    b,\n)\nprint(x)") == len("a,\n    b,\n)")


def test_python_dict_value_colon_is_not_a_block():
    scope = decide_scope('d = {\n    "a":', "\n}\n", PY)
    assert not scope.multiline


def test_empty_line_outside_a_block_start_is_single_line():
    scope = decide_scope("def f(x):\n    y = 1\n    ", "\n    return y\n", PY)
    assert not scope.multiline
    assert scope.base_indent == "    "


def test_brace_empty_block_start_is_multiline():
    scope = decide_scope("function f() {\n  ", "\n}\n", JS)
    assert scope.multiline
    assert scope.base_indent == "  "
    assert scope.suffix_closes_block


def test_brace_block_start_without_closer_in_suffix():
    scope = decide_scope("function f() {\n  ", "", JS)
    assert scope.multiline
    assert not scope.suffix_closes_block


def test_brace_mid_line_is_single_line():
    assert not decide_scope("function f() {\n  const x = ", "\n}\n", JS).multiline
    assert not decide_scope("function f() {\n  g(", ");\n}\n", JS).multiline


def test_opener_followed_by_a_comment_still_opens_a_block():
    assert decide_scope("if (x) { // start\n  ", "\n}\n", JS).multiline
    assert decide_scope("if x:  # start\n    ", "\n", PY).multiline


def test_brace_inside_a_comment_or_string_opens_nothing():
    assert not decide_scope('x = "{"\n', "\n", JS).multiline
    assert not decide_scope("// {\n", "\n", JS).multiline


def test_callers_can_force_multiline_on_and_off():
    assert decide_scope("x = ", "\n", PY, multiline=True).multiline
    assert not decide_scope("def f():\n    ", "\n", PY, multiline=False).multiline


def test_indent_unit_comes_from_the_file():
    prefix = "def a():\n  return 1\n\ndef f():"
    assert decide_scope(prefix, "\n", PY).base_indent == "  "
    assert decide_scope("func f() {", "\n}\n", GO).base_indent == "\t"


def test_unknown_language_uses_generic_rules():
    scope = decide_scope("foo {\n  ", "\n}\n", None)
    assert scope.multiline
    assert scope.stop_index("a\n  b\n}") == len("a\n  b")


# ---------------------------------------------------------------- stop_index


def test_single_line_stops_at_end_of_line():
    scope = decide_scope("x = foo(", ")\n", PY)
    assert scope.stop_index("a, b") is None
    assert scope.stop_index("a, b)\nprint(1)") == len("a, b)")


def test_multiline_closes_the_cursor_lines_brackets_and_goes_on():
    # `if (|` with nothing after: closing `(` finishes the line, it does not end the completion
    prefix = "def f(n):\n    for i in range(2, int(math."
    scope = decide_scope(prefix, "", PY, multiline=True)
    body = "sqrt(n)) + 1):\n        if n % i == 0:\n            return False\n    return True"
    assert scope.stop_index(body) is None
    assert scope.stop_index(body + "\nprint(1)") == len(body)
    # one closer too many still ends it, and a closer that the suffix has is not repeated
    assert decide_scope("    if (", "", PY, multiline=True).stop_index("x)) + y") == len("x))")
    assert decide_scope("    if (", ")\n", PY, multiline=True).stop_index("x):") == len("x")


def test_python_block_stops_at_dedent():
    scope = decide_scope("def f(x):\n    ", "\n", PY)
    generated = "y = x + 1\n    return y\ndef g():\n"
    assert scope.stop_index(generated) == len("y = x + 1\n    return y")


def test_python_block_allows_one_blank_line_and_nested_blocks():
    scope = decide_scope("def f(x):\n    ", "\n", PY)
    assert scope.stop_index("if x:\n        return 1\n\n    return 2\n") is None


def test_python_block_stops_at_a_blank_line_run():
    scope = decide_scope("def f(x):\n    ", "\n", PY)
    assert scope.stop_index("return 1\n\n\n    x = 2") == len("return 1")


def test_python_dedent_decided_only_once_the_line_has_text():
    scope = decide_scope("def f(x):\n    ", "\n", PY)
    assert scope.stop_index("return 1\n  ") is None


def test_brace_block_stops_before_the_closer_the_suffix_already_has():
    scope = decide_scope("function f() {\n  ", "\n}\n", JS)
    generated = "if (x) {\n    y();\n  }\n  return 1;\n}\nfunction g() {}"
    assert scope.stop_index(generated) == len("if (x) {\n    y();\n  }\n  return 1;")


def test_brace_block_keeps_its_closer_when_the_suffix_lacks_it():
    scope = decide_scope("function f() {\n  ", "", JS)
    generated = "return 1;\n}\nfunction g() {}"
    assert scope.stop_index(generated) == len("return 1;\n}")


def test_brace_closer_on_a_code_line_cuts_at_the_closer():
    scope = decide_scope("function f() {\n  ", "\n}\n", JS)
    assert scope.stop_index("return 1; }") == len("return 1;")


def test_braces_in_strings_and_comments_do_not_close_the_block():
    scope = decide_scope("function f() {\n  ", "\n}\n", JS)
    assert scope.stop_index('const s = "}";\n  // }\n  return s;') is None


def test_rust_lifetimes_are_not_quotes():
    scope = decide_scope("fn f() {\n    ", "\n}\n", RUST)
    assert scope.stop_index("let r: &'a str = x;\n    g('}');\n}") == len(
        "let r: &'a str = x;\n    g('}');"
    )


_CHUNKS = st.sampled_from(["\n", " ", "    ", "x", "y = 1", "(", ")", "{", "}", ":", ";", "[", "]"])


@given(st.lists(_CHUNKS, max_size=30), st.sampled_from(["py", "js"]))
def test_stop_index_is_stable_as_text_grows(chunks, which):
    """The decode loop may call stop_index after every token: a stop, once found, stays."""
    if which == "py":
        scope = decide_scope("def f(x):\n    ", "\n", PY)
    else:
        scope = decide_scope("function f() {\n  ", "\n}\n", JS)
    generated = "".join(chunks)
    for k in range(len(generated) + 1):
        stop = scope.stop_index(generated[:k])
        if stop is not None:
            assert stop <= k
            assert scope.stop_index(generated) == stop
            break
    fresh = dataclasses.replace(scope)  # a copy starts with no lines seen: same answer
    assert fresh.stop_index(generated) == scope.stop_index(generated)


# ---------------------------------------------------------------- suffix overlap


def test_closer_already_after_cursor_is_dropped():
    assert drop_suffix_overlap("x)", ")\n", PY, "y = foo(") == "x"


def test_balanced_candidate_keeps_its_own_closer():
    assert drop_suffix_overlap("bar(x)", ")\n", PY, "y = foo(") == "bar(x)"


def test_closing_quote_already_after_cursor_is_dropped():
    assert drop_suffix_overlap('hello"', '"\n', PY, 's = "') == "hello"


def test_rest_of_line_retyped_is_dropped():
    assert drop_suffix_overlap("a, x)", "x)\n", PY, "print(") == "a, "
    assert drop_suffix_overlap("x):", "):\n", PY, "if foo(") == "x"


def test_next_line_repeated_is_dropped():
    prefix, suffix = "def f(x):\n    ", "\n    return x\n"
    assert drop_suffix_overlap("y = 1\n    return x", suffix, PY, prefix) == "y = 1"
    assert drop_suffix_overlap("y = 1\n    retu", suffix, PY, prefix) == "y = 1"


def test_closing_brace_the_suffix_has_is_dropped():
    prefix, suffix = "function f() {\n  ", "\n}\n"
    assert drop_suffix_overlap("b();\n}", suffix, JS, prefix) == "b();"


def test_closing_brace_of_the_candidates_own_block_is_kept():
    prefix, suffix = "function f() {\n  ", "\n}\n"
    text = "if (a) {\n    b();\n  }"
    assert drop_suffix_overlap(text, suffix, JS, prefix) == text


def test_nothing_to_drop():
    assert drop_suffix_overlap("x + 1", "\n", PY, "y = ") == "x + 1"
    assert drop_suffix_overlap("x", "", PY, "y = ") == "x"


# ---------------------------------------------------------------- repetition


def test_same_line_repeated_is_cut_to_one():
    assert cut_repetition("foo()\nfoo()\nfoo()\nfoo()") == "foo()"


def test_repeated_line_after_the_cursor_line_is_cut():
    assert cut_repetition("value = 1\n    value = 1\n    value = 1") == "value = 1"


def test_block_repeating_to_the_end_is_cut_to_one_round():
    text = "a = 1\nb = 2\na = 1\nb = 2\na = 1\nb ="
    assert cut_repetition(text) == "a = 1\nb = 2"
    assert cut_repetition("a = 1\nb = 2\na = 1\nb = 2\n") == "a = 1\nb = 2"


def test_unit_repeating_to_the_end_of_a_line_is_cut():
    assert cut_repetition("x = foo(foo(foo(foo(foo(foo(foo(foo(fo") == "x = foo("


@pytest.mark.parametrize(
    "text",
    [
        "x = [0, 0, 0, 0]",
        "}\n}\n}\n}",
        "i++;\ni++;",
        "a = 1\nb = 2\na = 1",
        "# ------------------------------",
        "if x:\n    return 1\nreturn 2",
    ],
)
def test_ordinary_code_is_not_cut(text):
    assert cut_repetition(text) == text


# ---------------------------------------------------------------- clean_candidates


def _cands(*pairs):
    return [Candidate(text=t, logprob=lp) for t, lp in pairs]


def test_decode_stop_then_clean_cuts_to_scope_and_drops_overlap():
    prefix, suffix = "y = foo(", ")\n"
    scope = decide_scope(prefix, suffix, PY)
    generated = b"x)\nprint(y)"
    kept = scope.stop_bytes(generated)  # what the decode loop asks after each token
    assert kept == len("x)")
    out = clean_candidates(_cands((generated[:kept].decode(), -0.5)), prefix, suffix, scope)
    assert [c.text for c in out] == ["x"]


def test_stop_bytes_counts_bytes_not_characters():
    scope = decide_scope('s = "', '"\n', PY)
    assert scope.stop_bytes("héllo\nx".encode()) == len("héllo".encode()) == 6


def test_finish_drops_an_unfinished_line_and_cuts_a_late_block_at_its_last_full_line():
    line = decide_scope("y = foo(", ")\n", PY)
    assert line.finish("x, y", StopReason.PATIENCE) is None
    assert line.finish("x, y", StopReason.DEADLINE) == "x, y"
    block = decide_scope("def f(x):\n    ", "\n", PY)
    assert block.finish("y = 1\n    ret", StopReason.DEADLINE) == "y = 1"
    assert block.finish("y = 1\n    ret", StopReason.PATIENCE) == "y = 1"
    assert block.finish("y = 1\n    ret", StopReason.MAX_TOKENS) == "y = 1\n    ret"


def test_clean_drops_empty_and_keeps_higher_logprob_duplicate():
    prefix, suffix = "def f(x):\n    ", "\n"
    scope = decide_scope(prefix, suffix, PY)
    cands = _cands(("return x\n", -1.0), ("  \n", -0.1), ("return x", -0.2), ("return x + 1", -0.7))
    out = clean_candidates(cands, prefix, suffix, scope)
    assert [(c.text, c.logprob) for c in out] == [("return x", -0.2), ("return x + 1", -0.7)]


def test_clean_keeps_space_before_text_that_follows_on_the_line():
    prefix, suffix = "print(", "x)\n"
    scope = decide_scope(prefix, suffix, PY)
    out = clean_candidates(_cands(("a, x)", -0.1)), prefix, suffix, scope)
    assert out[0].text == "a, "


def test_clean_does_not_mutate_its_input():
    cands = _cands(("x)\n", -0.5))
    clean_candidates(cands, "f(", ")\n", decide_scope("f(", ")\n", PY))
    assert cands[0].text == "x)\n"


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["x", "x)", "x\n", " ", "", "y = 1", "y = 1\n"]), st.floats(-5, 0)
        )
    )
)
def test_clean_output_has_no_empty_or_duplicate_texts(pairs):
    scope = decide_scope("f(", ")\n", PY)
    out = clean_candidates(_cands(*pairs), "f(", ")\n", scope)
    texts = [c.text for c in out]
    assert all(t.strip() for t in texts)
    assert len(texts) == len(set(texts))


# ---------------------------------------------------------------- scanner


def test_scanner_counts_stray_and_unclosed_brackets():
    state, underflow = scan_brackets("a(b[c)]", JS)
    assert state.errors == 2 and state.stack == []  # ) closes over [, then ] has no opener
    assert underflow == 6
    state, underflow = scan_brackets("x) + (", JS)
    assert underflow == 1 and state.stack == ["("]


def test_scanner_skips_strings_comments_and_char_literals():
    assert scan_brackets("s = '(' # )\nt = \"[\"", PY)[0].stack == []
    assert scan_brackets("c = '(';  /* ) */ // }", language_for("c"))[0].stack == []
    assert scan_brackets('x = """(\n"""', PY)[0].stack == []


def test_code_part_ignores_comment_markers_in_strings():
    assert code_part('x = "#"  # note', PY) == 'x = "#"  '
    assert code_part("f(); // {", JS) == "f(); "


def test_minified_one_line_file_stays_cheap_and_sane():
    line = "var a=function(){return 1};" * 200_000  # ~5 MB, no newline
    prefix, suffix = line + "f(", ")" + line
    scope = decide_scope(prefix, suffix, JS)
    assert not scope.multiline
    out = clean_candidates(_cands(("x)", -0.1)), prefix, suffix, scope)
    assert [c.text for c in out] == ["x"]
