import pytest

from codecomplete.languages import language_for
from codecomplete.request import Candidate
from codecomplete.rerank import measure_rerank_ms, rerank, syntax_report

# language id -> (prefix, suffix, clean candidate, syntax-breaking candidate)
CASES = {
    "python": ("def area(w, h):\n    ", "\n\nprint(area(2, 3))\n", "return w * h", "return w h"),
    "javascript": (
        "function area(w, h) {\n  ",
        "\n}\nconsole.log(area(2, 3));\n",
        "return w * h;",
        "return w * (h;",
    ),
    "typescript": (
        "function area(w: number, h: number): number {\n  ",
        "\n}\n",
        "return w * h;",
        "return w * h);",
    ),
    "typescriptreact": (
        "const A = (p: { n: number }) => {\n  ",
        "\n};\n",
        "return <div>{p.n}</div>;",
        "return <div>{p.n</div>;",
    ),
    "go": ("package main\n\nfunc area(w, h int) int {\n\t", "\n}\n", "return w * h", "return w h"),
    "rust": ("fn area(w: i32, h: i32) -> i32 {\n    ", "\n}\n", "w * h", "w * (h"),
    "java": (
        "class A {\n  int area(int w, int h) {\n    ",
        "\n  }\n}\n",
        "return w * h;",
        "return w h;",
    ),
    "c": ("int area(int w, int h) {\n    ", "\n}\n", "return w * h;", "return w * (h;"),
    "cpp": (
        "#include <vector>\nint area(int w, int h) {\n    ",
        "\n}\n",
        "return w * h;",
        "return w * h));",
    ),
}


@pytest.mark.parametrize("language_id", CASES)
def test_syntax_breaking_candidate_ranks_below_clean_one(language_id):
    prefix, suffix, clean, broken = CASES[language_id]
    lang = language_for(language_id)
    # the model slightly prefers the broken one; the parse must overturn that
    cands = [Candidate(broken, logprob=-0.3), Candidate(clean, logprob=-0.5)]
    ranked = rerank(cands, prefix, suffix, lang)
    assert [c.text for c in ranked] == [clean, broken]
    assert ranked[0].syntax_ok and not ranked[1].syntax_ok
    assert ranked[0].score > ranked[1].score


@pytest.mark.parametrize("language_id", CASES)
def test_errors_already_in_the_file_do_not_count(language_id):
    prefix, suffix, clean, _ = CASES[language_id]
    lang = language_for(language_id)
    junk = "(((( ]] ;; @@\n"  # an error far above and far below the cursor
    filler = "\n".join(["// filler" if lang.line_comment == "//" else "# filler"] * 5) + "\n"
    report = syntax_report(junk + filler + prefix, clean, suffix + filler + junk, lang)
    assert report.ok, report


def test_error_on_the_line_being_typed_does_not_count():
    py = language_for("python")
    prefix, suffix = "def f(xs):\n    total = sum(", "\n    return total\n"
    assert syntax_report(prefix, "xs)", suffix, py).ok
    assert not syntax_report(prefix, "xs xs)", suffix, py).ok


def test_stray_closer_is_unbalanced_even_when_it_closes_the_open_bracket():
    py = language_for("python")
    report = syntax_report("def f(xs):\n    total = sum(", "xs))", "\n    return total\n", py)
    assert report.unbalanced_brackets == 1
    assert not report.ok


def test_dangling_operator_and_empty_block_header_are_incomplete():
    py = language_for("python")
    prefix, suffix = "def f(x):\n    ", "\n"
    assert syntax_report(prefix, "y = x +", suffix, py).incomplete
    assert syntax_report(prefix, "if x:", suffix, py).incomplete
    assert not syntax_report(prefix, "return x", suffix, py).incomplete
    assert not syntax_report(prefix, "i++;", "\n}\n", language_for("c")).incomplete


def test_unclosed_string_is_flagged():
    js = language_for("javascript")
    report = syntax_report("function f() {\n  ", "const s = 'abc;", "\n}\n", js)
    assert not report.ok


def test_completing_inside_a_string_is_fine():
    py = language_for("python")
    assert syntax_report('print("hello, ', "world", '")\n', py).ok
    assert syntax_report('print("hello, ', 'world")', "\n", py).ok


def test_multi_line_candidate_in_a_python_block():
    py = language_for("python")
    prefix, suffix = "def f(xs):\n    ", "\n\nprint(f([1]))\n"
    assert syntax_report(
        prefix, "total = 0\n    for x in xs:\n        total += x\n    return total", suffix, py
    ).ok
    assert not syntax_report(
        prefix, "total = 0\n    for x in xs\n        total += x", suffix, py
    ).ok


def test_cursor_deep_inside_a_long_class_is_parsed_with_its_header():
    """The window starts hundreds of lines below `class A {`; the header is brought along."""
    js = language_for("javascript")
    methods = "".join(f"  m{i}(x) {{\n    return x + {i};\n  }}\n" for i in range(200))
    prefix = "class A {\n" + methods + "  last(x) {\n    "
    suffix = "\n  }\n" + methods + "}\n"
    assert syntax_report(prefix, "return x * 2;", suffix, js).ok
    assert not syntax_report(prefix, "return x * * 2;", suffix, js).ok


def test_huge_file_is_handled_through_a_window():
    py = language_for("python")
    body = "x = 1\n" * 100_000
    report = syntax_report(body + "def f():\n    ", "return (", "\n" + body, py)
    assert not report.ok
    assert syntax_report(body + "def f():\n    ", "return 1", "\n" + body, py).ok


def test_unknown_language_ranks_by_logprob_only():
    cands = [
        Candidate("a", logprob=-2.0),
        Candidate("b((", logprob=-0.1),
        Candidate("c", logprob=-1.0),
    ]
    ranked = rerank(cands, "x = ", "\n", None)
    assert [c.text for c in ranked] == ["b((", "c", "a"]
    assert all(c.score_parts == {"logprob": c.logprob} and c.syntax_ok for c in ranked)


def test_rerank_fills_score_parts_and_is_stable():
    py = language_for("python")
    cands = [Candidate("x + 1", logprob=-0.5), Candidate("y + 1", logprob=-0.5)]
    ranked = rerank(cands, "z = ", "\n", py)
    assert [c.text for c in ranked] == ["x + 1", "y + 1"]
    for c in ranked:
        assert set(c.score_parts) == {"logprob", "syntax", "length"}
        assert c.score == pytest.approx(sum(c.score_parts.values()))
        assert c.score_parts["syntax"] == 0.0


def test_syntax_weight_zero_ranks_by_logprob_and_length():
    py = language_for("python")
    cands = [Candidate("w h", logprob=-0.3), Candidate("w * h", logprob=-0.5)]
    ranked = rerank(cands, "def f(w, h):\n    return ", "\n", py, syntax_weight=0.0)
    assert ranked[0].text == "w h"
    assert not ranked[0].syntax_ok  # still reported


def test_rerank_does_not_mutate_its_input():
    cands = [Candidate("x", logprob=-0.5)]
    rerank(cands, "y = ", "\n", language_for("python"))
    assert cands[0].score == 0.0 and cands[0].score_parts == {}


@pytest.mark.parametrize(
    "prefix, text, suffix",
    [
        ("", "x = 1", ""),
        ("x = ", "", "\n"),
        ('s = "héllo wörld 😀"\nt = f(', "s)", "\n"),
        ("def f():\r\n    ", "return 1", "\r\n"),
    ],
)
def test_edge_inputs_parse_without_raising(prefix, text, suffix):
    assert syntax_report(prefix, text, suffix, language_for("python")).ok


def test_measure_rerank_reports_timings_and_checks():
    lines = [f"def f{i}(x):\n    return x + {i}  # the value\n" for i in range(40)]
    result = measure_rerank_ms("\n".join(lines), language_for("python"), positions=3)
    assert result["cursors"] == 3
    assert result["true_rest_ok"] == 3
    assert result["per_candidate_cpu_ms_median"] > 0
    assert result["typed_first_candidate_cpu_ms_median"] > 0


def test_minified_one_line_file_is_handled_through_a_window():
    js = language_for("javascript")
    line = "var a=function(){return 1};" * 200_000  # ~5 MB, no newline
    assert syntax_report(line + "f(", "x", ")" + line, js).ok
    assert not syntax_report(line + "f(", "x))", ")" + line, js).ok


def test_closing_the_block_the_suffix_already_closes_is_flagged():
    js = language_for("javascript")
    prefix, suffix = "function f() {\n  ", "\n}\nf();\n"
    assert syntax_report(prefix, "return 1;", suffix, js).ok
    report = syntax_report(prefix, "return 1;\n}", suffix, js)
    assert report.unbalanced_brackets == 1 and not report.ok


def _typing_windows(language_id: str, keystrokes: int):
    """The windows of a replay typing a sample file's lines back in, one character a step,
    with a jump to another place in the middle (the reparse falls back to a fresh parse)."""
    from codecomplete.bench.common import TYPING_SAMPLE
    from codecomplete.rerank import window_texts

    text = TYPING_SAMPLE.read_text()
    lang = language_for("", "x.py")
    start = len(text) // 2
    suffix = text[start + keystrokes:]
    offsets = list(range(start, start + keystrokes // 2)) + list(range(len(text) // 5, len(text) // 5 + keystrokes // 2))
    for o in offsets:
        yield lang, window_texts(text[:o], suffix if o >= start else text[o:], lang)


def test_a_window_reparsed_from_the_last_keystrokes_tree_reports_what_a_fresh_parse_does():
    import codecomplete.rerank as r

    texts = ["foo)", "bar(x, y)\n", "self.a", "", "if x:\n    return [1,"]
    for lang, windows in _typing_windows("python", 60):
        r._baseline.cache_clear()
        incremental = r._baseline(lang, *windows)
        got = [r._report(incremental, t, lang) for t in texts]
        r._baseline.cache_clear()
        r.forget_windows()
        fresh = r._baseline(lang, *windows)
        assert str(incremental.tree.root_node) == str(fresh.tree.root_node)
        assert incremental.error_rows == fresh.error_rows
        assert got == [r._report(fresh, t, lang) for t in texts]
    # the last call left a window behind: the next parse of the same one reuses its tree
    assert r._parse_window(lang, fresh.prefix_bytes + fresh.suffix_bytes + fresh.tail) is fresh.tree


def test_interleaved_typists_each_reparse_from_their_own_documents_last_window(monkeypatch):
    """A replica's rerank worker checks many typists' windows in turn: named by document,
    each keystroke's window is reparsed from that document's last tree (not parsed afresh
    because another typist's came in between), with the reports of a fresh parse; unnamed,
    they share one per language and miss."""
    import codecomplete.rerank as r
    from codecomplete.bench.common import TYPING_SAMPLE
    from codecomplete.rerank import window_reports, window_texts

    real = r.parser_for
    parses = []  # per parse: from an old tree (a window's reparse, or a candidate's edit)

    class Counting:
        def __init__(self, parser):
            self.parser = parser

        def parse(self, document, old_tree=None):
            parses.append(old_tree is not None)
            return self.parser.parse(document, old_tree) if old_tree is not None else self.parser.parse(document)

    monkeypatch.setattr(r, "parser_for", lambda lang: Counting(real(lang)))
    text = TYPING_SAMPLE.read_text()
    lang = language_for("", "x.py")
    starts = {"a.py": len(text) // 3, "b.py": 2 * len(text) // 3}
    texts = ["foo)", "self.a", "if x:\n    return [1,"]
    for named in (True, False):
        r.forget_windows()
        reparsed = {name: [] for name in starts}
        for step in range(10):
            for name, start in starts.items():
                o = start + step
                windows = window_texts(text[:o], text[o:], lang)
                r._baseline.cache_clear()
                mark = len(parses)
                got = window_reports(lang, windows, texts, name if named else None)
                reparsed[name].append(parses[mark])  # the window's parse comes first
                r._baseline.cache_clear()
                assert got == window_reports(lang, windows, texts, "fresh")  # no tree of its own yet
                r._LAST_WINDOWS.pop((lang.id, "fresh"))
        for name in starts:
            assert reparsed[name] == ([False] + [True] * 9 if named else [False] * 10), (named, name)
