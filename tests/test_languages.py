import subprocess
import sys
import threading

import pytest

from codecomplete.languages import LANGUAGES, language_for, parser_for

SNIPPETS = {
    "python": "def f(x):\n    return x + 1\n",
    "javascript": "function f(x) { return x + 1; }\n",
    "typescript": "function f(x: number): number { return x + 1; }\n",
    "tsx": "const A = (p: { n: number }) => <div>{p.n}</div>;\n",
    "go": "package main\n\nfunc f(x int) int { return x + 1 }\n",
    "rust": "fn f(x: i32) -> i32 { x + 1 }\n",
    "java": "class A { int f(int x) { return x + 1; } }\n",
    "c": "int f(int x) { return x + 1; }\n",
    "cpp": "template <typename T> T f(T x) { return x + 1; }\n",
}


@pytest.mark.parametrize(
    "language_id, expected",
    [
        ("python", "python"),
        ("javascript", "javascript"),
        ("javascriptreact", "javascript"),
        ("typescript", "typescript"),
        ("typescriptreact", "tsx"),
        ("go", "go"),
        ("rust", "rust"),
        ("java", "java"),
        ("c", "c"),
        ("cpp", "cpp"),
        ("Python", "python"),
    ],
)
def test_language_id_selects_language(language_id, expected):
    assert language_for(language_id).id == expected


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/src/a.py", "python"),
        ("a.mjs", "javascript"),
        ("lib/x.ts", "typescript"),
        ("App.tsx", "tsx"),
        ("main.go", "go"),
        ("lib.rs", "rust"),
        ("A.java", "java"),
        ("x.h", "c"),
        ("x.hpp", "cpp"),
        ("C:\\src\\X.CPP", "cpp"),
    ],
)
def test_extension_selects_language_when_language_id_is_unknown(path, expected):
    assert language_for("", path).id == expected
    assert language_for("plaintext", path).id == expected


def test_language_id_wins_over_extension():
    assert language_for("cpp", "x.h").id == "cpp"


@pytest.mark.parametrize(
    "language_id, path", [("", ""), ("cobol", "x.cbl"), ("", "Makefile"), ("", ".py/")]
)
def test_unknown_language_is_none(language_id, path):
    assert language_for(language_id, path) is None


def test_language_for_never_raises_on_odd_input():
    assert language_for(None, None) is None  # type: ignore[arg-type]
    assert language_for(5, b"x.py") is None  # type: ignore[arg-type]


@pytest.mark.parametrize("lang", LANGUAGES, ids=lambda lang: lang.id)
def test_every_grammar_parses_a_clean_snippet(lang):
    tree = parser_for(lang).parse(SNIPPETS[lang.id].encode())
    assert not tree.root_node.has_error


def test_parser_is_cached_per_thread():
    lang = language_for("python")
    assert parser_for(lang) is parser_for(lang)
    other = []
    thread = threading.Thread(target=lambda: other.append(parser_for(lang)))
    thread.start()
    thread.join()
    assert other[0] is not parser_for(lang)


def test_import_does_not_load_tree_sitter():
    code = (
        "import sys, codecomplete.languages, codecomplete.postprocess, codecomplete.rerank\n"
        "assert not any(m.startswith('tree_sitter') for m in sys.modules), sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_block_rules():
    assert language_for("python").block_style == "indent"
    assert ":" in language_for("python").block_openers
    assert language_for("go").block_style == "brace"
    assert language_for("rust").line_comment == "//"
    assert language_for("python").line_comment == "#"
