"""Turn (language, source) into a sandboxed program, and cut completions where a harness would stop."""

from __future__ import annotations

import ast
import functools
import io
import shutil
import subprocess
import sys
import tokenize
from dataclasses import dataclass, field

from codecomplete.eval.sandbox import Limits

# JVM reservations sized to fit RLIMIT_AS (the defaults reserve gigabytes of address space).
_JVM_FLAGS = ("-Xmx256m", "-Xss4m", "-XX:CompressedClassSpaceSize=64m", "-XX:ReservedCodeCacheSize=64m",
              "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:-UsePerfData")

# The JavaScript tests `require("lodash")` for isEqual (and chunk once). Where no lodash is
# installed, this shim is written beside the program.
LODASH_SHIM = r"""'use strict';
function tag(x) { return Object.prototype.toString.call(x); }
function isEqual(a, b) {
  if (a === b || (a !== a && b !== b)) return true;
  if (typeof a !== 'object' || typeof b !== 'object' || a === null || b === null) return false;
  if (tag(a) !== tag(b)) return false;
  if (a instanceof Date) return a.getTime() === b.getTime();
  if (a instanceof Number || a instanceof String || a instanceof Boolean) return isEqual(a.valueOf(), b.valueOf());
  if (a instanceof Map) {
    if (a.size !== b.size) return false;
    for (const [k, v] of a) if (!b.has(k) || !isEqual(v, b.get(k))) return false;
    return true;
  }
  if (a instanceof Set) {
    if (a.size !== b.size) return false;
    for (const v of a) if (!b.has(v)) return false;
    return true;
  }
  if (Array.isArray(a)) {
    if (a.length !== b.length) return false;
    for (let i = 0; i < a.length; i++) if (!isEqual(a[i], b[i])) return false;
    return true;
  }
  const ka = Object.keys(a), kb = Object.keys(b);
  if (ka.length !== kb.length) return false;
  for (const k of ka) if (!Object.prototype.hasOwnProperty.call(b, k) || !isEqual(a[k], b[k])) return false;
  return true;
}
function chunk(array, size) {
  size = Math.max(Math.trunc(size === undefined ? 1 : size), 0);
  const out = [];
  for (let i = 0; i < (array ? array.length : 0) && size > 0; i += size) out.push(array.slice(i, i + size));
  return out;
}
module.exports = { isEqual, chunk };
"""


@dataclass
class Program:
    """Files to write into the sandbox's temp dir, and the command to run there."""

    files: dict[str, str]
    argv: list[str]
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class Toolchain:
    """A language's run recipe and the binaries it needs."""

    language: str
    binaries: tuple[str, ...]
    note: str = ""


TOOLCHAINS = {
    "python": Toolchain("python", ()),
    "javascript": Toolchain("javascript", ("node",)),
    "typescript": Toolchain("typescript", ("tsc", "node"), "npm install -g typescript"),
    "java": Toolchain("java", ("javac", "java"), "a JDK (17 or later)"),
    "go": Toolchain("go", ("go",), "the Go toolchain"),
}


def missing_binaries(language: str) -> list[str]:
    """Binaries the language's recipe needs that are not on PATH ([] when it can run)."""
    toolchain = TOOLCHAINS.get(language)
    if toolchain is None:
        return [f"<no recipe for {language}>"]
    return [b for b in toolchain.binaries if shutil.which(b) is None]


@functools.lru_cache(maxsize=1)
def system_lodash_available() -> bool:
    """Whether node resolves `lodash` on its own (global install or NODE_PATH)."""
    if shutil.which("node") is None:
        return False
    try:
        done = subprocess.run(["node", "-e", "require.resolve('lodash')"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def build_program(language: str, source: str, timeout_s: float | None = None) -> Program:
    """A program that runs `source` (the whole file: prompt, completion and test) and exits 0 on success."""
    if language == "python":
        program = Program({"main.py": source}, [sys.executable, "-I", "main.py"], Limits(timeout_s=10.0))
    elif language == "javascript":
        files = {"main.js": source}
        if not system_lodash_available():
            files["node_modules/lodash/index.js"] = LODASH_SHIM
        program = Program(files, ["node", "--max-old-space-size=256", "main.js"],
                          Limits(timeout_s=15.0, memory_bytes=2 << 30))
    elif language == "typescript":
        files = {"main.ts": source}
        if not system_lodash_available():
            files["node_modules/lodash/index.js"] = LODASH_SHIM
        # tsc's exit code reports type errors (missing @types/node among them); it still emits
        # JavaScript, and whether that runs is the verdict.
        script = "tsc --target es2020 --module commonjs --skipLibCheck main.ts >tsc.log 2>&1; node --max-old-space-size=256 main.js"
        program = Program(files, ["sh", "-c", script], Limits(timeout_s=60.0, memory_bytes=4 << 30, cpu_s=60))
    elif language == "java":
        javac_flags = " ".join("-J" + f for f in _JVM_FLAGS)
        script = (f"javac -nowarn -encoding UTF-8 {javac_flags} Main.java && "
                  f"java {' '.join(_JVM_FLAGS)} Main")
        program = Program({"Main.java": source}, ["sh", "-c", script],
                          Limits(timeout_s=30.0, memory_bytes=2 << 30, cpu_s=30, max_processes=128))
    elif language == "go":
        script = "go build -o prog main.go && ./prog"
        program = Program({"main.go": source}, ["sh", "-c", script],
                          Limits(timeout_s=60.0, memory_bytes=4 << 30, cpu_s=60, max_processes=256))
    else:
        raise ValueError(f"no run recipe for {language}")
    if timeout_s is not None:
        program.limits = Limits(**{**program.limits.__dict__, "timeout_s": timeout_s})
    return program


PYTHON_DEFINITION_STARTS = ("def", "class", "async", "@", "import", "from")


def _python_top_level_starts(source: str) -> list[tuple[int, str]]:
    """(character offset, first token) of every top-level statement, found with tokenize."""
    line_offsets = [0]
    for line in source.splitlines(keepends=True):
        line_offsets.append(line_offsets[-1] + len(line))
    starts = []
    at_statement_start = True
    skip = (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NEWLINE:
                at_statement_start = True
            elif tok.type not in skip and at_statement_start:
                at_statement_start = False
                if tok.start[1] == 0:
                    starts.append((line_offsets[tok.start[0] - 1], tok.string))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass  # unfinished code: keep what was found
    return starts


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


def truncate_python(prompt: str, completion: str) -> str:
    """Keep definitions (helpers after the function are fine); cut at the first top-level
    statement that runs code (print, assert, `if __name__`, a call). If the rest does not
    parse (a helper cut off at the token limit), drop trailing top-level blocks until it does."""
    source = prompt + completion
    starts = [(offset - len(prompt), token) for offset, token in _python_top_level_starts(source) if offset >= len(prompt)]
    cut = next((offset for offset, token in starts if token not in PYTHON_DEFINITION_STARTS), len(completion))
    body = completion[:cut]
    if _parses(prompt + body):
        return body
    for offset, _ in reversed([s for s in starts if 0 < s[0] < cut]):
        if _parses(prompt + completion[:offset]):
            return completion[:offset]
    return body


def truncate_braces(prompt: str, completion: str, language: str) -> str:
    """Cut right after the brace that closes everything the prompt left open; unchanged if none does."""
    text = prompt + completion
    depth = 0
    i, n = 0, len(text)
    quotes = "\"'" if language == "java" else "\"'`"
    while i < n:
        ch = text[i]
        if text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end == -1 else end
            continue
        if text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end == -1 else end + 2
            continue
        if ch in quotes:
            i += 1
            while i < n and text[i] != ch:
                if text[i] == "\\":
                    i += 1
                elif text[i] == "\n" and ch != "`":
                    break  # unterminated literal: stop at the line end
                i += 1
            i += 1
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth <= 0 and i >= len(prompt):
                return completion[: i + 1 - len(prompt)]
        i += 1
    return completion


def truncate_completion(language: str, prompt: str, completion: str) -> str:
    """Where an execution harness stops a left-to-right completion for this language."""
    if language == "python":
        return truncate_python(prompt, completion)
    if language in ("java", "javascript", "typescript", "go"):
        return truncate_braces(prompt, completion, language)
    return completion


def left_to_right_source(language: str, prompt: str, completion: str, test: str, entry_point: str) -> str:
    """prompt + completion (cut where a harness stops) + test; Python also calls check(entry_point)."""
    source = f"{prompt}{truncate_completion(language, prompt, completion)}\n{test}\n"
    if language == "python":
        source += f"\ncheck({entry_point})\n"
    return source
