"""Side by side with llama.cpp: one FIM request on the same GGUF file, cold and warm, N=1 and N=4.

llama.cpp (through llama-cpp-python) gets the Qwen PSM prompt
`<|fim_prefix|>prefix<|fim_suffix|>suffix<|fim_middle|>`; cold is the first request after
load (~1k prompt tokens), warm the same document with one more typed character (llama.cpp
reuses the longest common token prefix of its last prompt). N=4 is four sequential
completions (greedy, then three sampled), which is what a llama.cpp user gets without
n_cmpl. Our engine gets the same document and cursor with n=1 / n=4, multiline off and a
large deadline. Both use the same thread count. Needs `pip install 'codecomplete[llamacpp]'`
for the llama.cpp rows; without it those rows are skipped with a note.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .common import TYPING_SAMPLE, emit, format_table, progress

ENGINE_SYSTEMS = ("onnx-fp32", "onnx-int8", "torch-fp32")
DEFAULT_SYSTEMS = ("llamacpp", "onnx-fp32", "onnx-int8", "torch-fp32")
DEFAULT_FILE = TYPING_SAMPLE
DEFAULT_GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"


@dataclass
class Row:
    system: str
    stage: str  # cold | warm
    n: int
    ms: float
    tokens: int  # generated tokens, all candidates together
    text: str = ""  # the first (greedy) candidate


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"GGUF file (default: {DEFAULT_GGUF_NAME} in $CODECOMPLETE_CACHE or ~/.cache/codecomplete)")
    p.add_argument("--threads", type=int, default=2, help="threads for every system")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help=f"comma-separated, from llamacpp, {', '.join(ENGINE_SYSTEMS)}")
    p.add_argument("--file", default=str(DEFAULT_FILE), help="source file the request is cut from")
    p.add_argument("--prefix-tokens", type=int, default=760, help="prefix length before the cursor (approx.)")
    p.add_argument("--suffix-tokens", type=int, default=240, help="suffix length after the cursor (approx.)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--n", default="1,4", help="candidate counts")
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--json", action="store_true")


def default_model() -> Path:
    from codecomplete.hub import cache_root

    return cache_root() / DEFAULT_GGUF_NAME


@dataclass
class Document:
    text: str  # the document as the cold request sees it
    offset: int  # cold cursor
    typed: str  # the character the warm request types at the cursor

    def warm(self) -> tuple[str, int]:
        return self.text[: self.offset] + self.typed + self.text[self.offset:], self.offset + 1

    def fim_prompt(self, warm: bool = False) -> str:
        text, offset = self.warm() if warm else (self.text, self.offset)
        return f"{FIM_PREFIX}{text[:offset]}{FIM_SUFFIX}{text[offset:]}{FIM_MIDDLE}"


def cut_document(source: str, count_tokens, prefix_tokens: int, suffix_tokens: int) -> Document:
    """A window of the source around a cursor inside an identifier: ~prefix_tokens before, ~suffix_tokens after.

    The cursor sits after the first two characters of an identifier on a line in the
    middle of the window; the warm request types the identifier's third character."""
    lines = source.splitlines(keepends=True)
    counts = [count_tokens(line) for line in lines]
    cursor_line = next((i for i in range(len(lines))
                        if sum(counts[:i]) >= prefix_tokens and lines[i].lstrip()[:3].isidentifier()), None)
    if cursor_line is None:
        raise ValueError("the source file is too short for the prompt budget")
    first = cursor_line
    while first > 0 and sum(counts[first - 1: cursor_line]) <= prefix_tokens:
        first -= 1
    last = cursor_line + 1
    while last < len(lines) and sum(counts[cursor_line + 1: last + 1]) <= suffix_tokens:
        last += 1
    line = lines[cursor_line]
    indent = len(line) - len(line.lstrip())
    prefix = "".join(lines[first:cursor_line]) + line[: indent + 2]
    rest = line[indent + 2:] + "".join(lines[cursor_line + 1: last])
    typed, suffix = rest[0], rest[1:]
    return Document(prefix + suffix, len(prefix), typed)


# -- llama.cpp ------------------------------------------------------------------------------

def run_llamacpp(model: Path, doc: Document, threads: int, ns: list[int], max_tokens: int, n_ctx: int) -> dict:
    """Load, then cold and warm requests for each N; llama.cpp's KV prefix cache serves warm."""
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                          logits_all=False, verbose=False)
    load_ms = (time.perf_counter() - t0) * 1000
    prompts = {stage: llm.tokenize(doc.fim_prompt(stage == "warm").encode("utf-8"), add_bos=False, special=True)
               for stage in ("cold", "warm")}

    def candidates(tokens: list[int], n: int) -> tuple[int, str]:
        generated, first = 0, ""
        for i in range(n):
            sampled = {"temperature": 0.0} if i == 0 else {"temperature": 0.8, "top_p": 0.95, "seed": i}
            out = llm.create_completion(prompt=tokens, max_tokens=max_tokens, stop=["\n"], **sampled)
            generated += out["usage"]["completion_tokens"]
            first = first if i else out["choices"][0]["text"]
        return generated, first

    rows = []
    for n in ns:
        llm.reset()  # forget the previous prompt: the cold request evaluates all of it
        for stage in ("cold", "warm"):
            t = time.perf_counter()
            generated, text = candidates(prompts[stage], n)
            rows.append(Row("llamacpp", stage, n, round((time.perf_counter() - t) * 1000, 1), generated, text))
            progress(f"  llamacpp {stage} n={n}: {rows[-1].ms:.0f} ms, {generated} tokens")
    return {"load_ms": round(load_ms, 1), "prompt_tokens": len(prompts["cold"]), "rows": rows,
            "version": getattr(llama_cpp, "__version__", "")}


# -- our engine -----------------------------------------------------------------------------

def load_engine(system: str, model: Path, threads: int):
    """Engine over the GGUF file in one runtime, with the thread count set."""
    from codecomplete.engine import Engine
    from codecomplete.models.format.gguf_import import load_gguf

    runtime_name, precision = system.split("-")
    source = load_gguf(model, precision=precision)
    if runtime_name == "torch":
        from codecomplete.runtime.torch import TorchRuntime

        return Engine(TorchRuntime(source, precision=precision, threads=threads))
    from codecomplete.runtime.onnx import OnnxRuntime

    return Engine(OnnxRuntime(source, precision=precision, threads=threads))


def run_engine(system: str, model: Path, doc: Document, threads: int, ns: list[int], max_tokens: int) -> dict:
    """Load, then cold and warm requests for each N (warm reuses the prefill KV, not the suggestion cache)."""
    from codecomplete.request import CompletionOptions, CompletionRequest

    t0 = time.perf_counter()
    engine = load_engine(system, model, threads)
    load_ms = (time.perf_counter() - t0) * 1000
    progress(f"  {system} loaded in {load_ms:.0f} ms")
    rows, prompt_tokens = [], 0
    for n in ns:
        engine.contexts.clear()
        for stage in ("cold", "warm"):
            engine.suggestions.clear()  # typing-as-suggested would answer the warm request for free
            text, offset = doc.warm() if stage == "warm" else (doc.text, doc.offset)
            opts = CompletionOptions(n=n, max_new_tokens=max_tokens, multiline=False, deadline_ms=600_000.0)
            t = time.perf_counter()
            done = engine.complete(CompletionRequest(text=text, offset=offset, path="bench.py", options=opts))
            ms = (time.perf_counter() - t) * 1000
            prompt_tokens = prompt_tokens or done.prefill_new_tokens + done.prefill_reused_tokens
            first = done.candidates[0].text if done.candidates else ""
            rows.append(Row(system, stage, n, round(ms, 1), done.tokens_generated, first))
            progress(f"  {system} {stage} n={n}: {ms:.0f} ms, {done.tokens_generated} tokens")
    return {"load_ms": round(load_ms, 1), "prompt_tokens": prompt_tokens, "rows": rows,
            "runtime": engine.describe()}


def ratios(rows: list[Row], baseline: str = "llamacpp") -> list[dict]:
    """ours / llama.cpp for every (stage, n) both have."""
    base = {(r.stage, r.n): r.ms for r in rows if r.system == baseline}
    return [{"system": r.system, "stage": r.stage, "n": r.n, "ratio": round(r.ms / base[(r.stage, r.n)], 2)}
            for r in rows if r.system != baseline and (r.stage, r.n) in base and base[(r.stage, r.n)] > 0]


def run(args: argparse.Namespace) -> int:
    model = Path(args.model) if args.model else default_model()
    if not model.is_file():
        print(f"bench llamacpp: no GGUF file at {model} (python -m codecomplete.models.fetch_eval_model, or --model)")
        return 2
    systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in systems if s != "llamacpp" and s not in ENGINE_SYSTEMS]
    if unknown:
        print(f"bench llamacpp: unknown systems {unknown}")
        return 2
    ns = [int(x) for x in args.n.split(",")]
    from codecomplete.models.format.gguf_import import load_gguf

    tokenizer = load_gguf(model).tokenizer
    doc = cut_document(Path(args.file).read_text(), lambda s: len(tokenizer.encode(s)),
                       args.prefix_tokens, args.suffix_tokens)
    notes, details, rows = [], {}, []
    for system in systems:
        progress(f"bench llamacpp: {system}, {args.threads} threads")
        if system == "llamacpp":
            if importlib.util.find_spec("llama_cpp") is None:
                notes.append("llama.cpp rows skipped: llama-cpp-python is not installed "
                             "(pip install 'codecomplete[llamacpp]')")
                continue
            result = run_llamacpp(model, doc, args.threads, ns, args.max_tokens, args.n_ctx)
        else:
            try:
                result = run_engine(system, model, doc, args.threads, ns, args.max_tokens)
            except Exception as e:  # one runtime failing on this model must not hide the others
                notes.append(f"{system} failed: {type(e).__name__}: {e}")
                continue
        rows += result.pop("rows")
        details[system] = result
    out = {"model": model.name, "threads": args.threads, "max_new_tokens": args.max_tokens,
           "typed": doc.typed, "systems": details, "rows": [asdict(r) for r in rows],
           "ratios": ratios(rows), "notes": notes}
    by_key = {(x["system"], x["stage"], x["n"]): x["ratio"] for x in out["ratios"]}
    table = format_table([{**asdict(r), "text": repr(r.text), "vs llama.cpp": by_key.get((r.system, r.stage, r.n), "")}
                          for r in rows], ["system", "stage", "n", "ms", "tokens", "vs llama.cpp", "text"])
    emit(out, args.json, table)
    return 0
