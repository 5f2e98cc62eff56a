"""LSP languageId / file extension -> tree-sitter grammar, comment and block rules."""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from typing import Any

BRACKETS = (("(", ")"), ("[", "]"), ("{", "}"))


@dataclass(frozen=True)
class Language:
    """What the engine needs to know about one programming language."""

    id: str
    language_ids: tuple[str, ...]  # LSP languageIds
    extensions: tuple[str, ...]  # lower case, with the dot
    grammar_module: str  # the per-language tree-sitter wheel
    grammar_function: str  # the function in that wheel returning the language pointer
    block_style: str  # "indent" (Python) or "brace"
    line_comment: str
    block_comment: tuple[str, str] | None = ("/*", "*/")
    quotes: tuple[str, ...] = ('"',)  # string delimiters, longest first
    multiline_quotes: tuple[str, ...] = ()  # delimiters whose strings may span lines
    char_literals: bool = True  # 'x' is a character literal, a lone ' is not a string
    brackets: tuple[tuple[str, str], ...] = BRACKETS
    indent_unit: str = "    "  # default when the file does not tell

    @property
    def block_openers(self) -> tuple[str, ...]:
        """Line endings after which a new block starts."""
        openers = tuple(open_ for open_, _ in self.brackets)
        return openers + (":",) if self.block_style == "indent" else openers


_C_LIKE = dict(block_style="brace", line_comment="//")
# JavaScript and TypeScript: template strings span lines, no character literals, 2-space indent
_JS_LIKE = dict(_C_LIKE, quotes=('"', "'", "`"), multiline_quotes=("`",), char_literals=False, indent_unit="  ")

LANGUAGES: tuple[Language, ...] = (
    Language(
        "python",
        ("python",),
        (".py", ".pyi", ".pyw"),
        "tree_sitter_python",
        "language",
        block_style="indent",
        line_comment="#",
        block_comment=None,
        quotes=('"""', "'''", '"', "'"),
        multiline_quotes=('"""', "'''"),
        char_literals=False,
    ),
    Language(
        "javascript",
        ("javascript", "javascriptreact"),
        (".js", ".jsx", ".mjs", ".cjs"),
        "tree_sitter_javascript",
        "language",
        **_JS_LIKE,
    ),
    Language(
        "typescript",
        ("typescript",),
        (".ts", ".mts", ".cts"),
        "tree_sitter_typescript",
        "language_typescript",
        **_JS_LIKE,
    ),
    Language(
        "tsx",
        ("typescriptreact",),
        (".tsx",),
        "tree_sitter_typescript",
        "language_tsx",
        **_JS_LIKE,
    ),
    Language(
        "go",
        ("go",),
        (".go",),
        "tree_sitter_go",
        "language",
        **_C_LIKE,
        quotes=('"', "`"),
        multiline_quotes=("`",),
        indent_unit="\t",
    ),
    Language(
        "rust",
        ("rust",),
        (".rs",),
        "tree_sitter_rust",
        "language",
        **_C_LIKE,
    ),  # Rust strings may span lines, but scanning them as one-line keeps a mid-string start local
    Language("java", ("java",), (".java",), "tree_sitter_java", "language", **_C_LIKE),
    Language("c", ("c",), (".c", ".h"), "tree_sitter_c", "language", **_C_LIKE),
    Language(
        "cpp",
        ("cpp", "cuda-cpp"),
        (".cpp", ".cc", ".cxx", ".c++", ".hpp", ".hh", ".hxx", ".h++", ".ipp", ".cu", ".cuh"),
        "tree_sitter_cpp",
        "language",
        **_C_LIKE,
    ),
)

_BY_LANGUAGE_ID = {lid: lang for lang in LANGUAGES for lid in lang.language_ids}
_BY_LANGUAGE_ID.update({lang.id: lang for lang in LANGUAGES})
_BY_EXTENSION = {ext: lang for lang in LANGUAGES for ext in lang.extensions}


def language_for(language_id: str, path: str = "") -> Language | None:
    """The language for an LSP languageId, else for the path's extension; None if unknown."""
    if isinstance(language_id, str):
        lang = _BY_LANGUAGE_ID.get(language_id.strip().lower())
        if lang is not None:
            return lang
    if not isinstance(path, str) or not path:
        return None
    _, ext = os.path.splitext(path)
    return _BY_EXTENSION.get(ext.lower())


_grammars: dict[str, Any] = {}
_grammar_lock = threading.Lock()
_parsers = threading.local()  # tree-sitter parsers must not be shared between threads


def grammar_for(lang: Language) -> Any:
    """The tree_sitter.Language of a language, loaded on first use (the import costs ~10 ms)."""
    grammar = _grammars.get(lang.id)
    if grammar is None:
        with _grammar_lock:
            grammar = _grammars.get(lang.id)
            if grammar is None:
                import tree_sitter

                module = importlib.import_module(lang.grammar_module)
                grammar = tree_sitter.Language(getattr(module, lang.grammar_function)())
                _grammars[lang.id] = grammar
    return grammar


def parser_for(lang: Language) -> Any:
    """A tree_sitter.Parser for the language, cached per thread."""
    cache = getattr(_parsers, "by_id", None)
    if cache is None:
        cache = _parsers.by_id = {}
    parser = cache.get(lang.id)
    if parser is None:
        import tree_sitter

        parser = cache[lang.id] = tree_sitter.Parser(grammar_for(lang))
    return parser
