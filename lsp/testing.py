"""A stand-in engine for protocol and editor tests: known candidates at a chosen speed.

Start a server with it: `codecomplete-lsp --engine-factory codecomplete.lsp.testing:fake_engine`.
The environment tunes it: CODECOMPLETE_FAKE_STEP_MS (time per decode step, default 1),
CODECOMPLETE_FAKE_LOAD_MS (load time, default 0), CODECOMPLETE_FAKE_PRINT (print to
stdout while loading, as a chatty library would); a model folder may hold a file
`fake_step_ms` with the step time. A model folder that does not exist fails to load with
ModelLoadError, like the real engine.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from codecomplete.request import Candidate, Completion, CompletionRequest
from codecomplete.text import partial_word_start

WORDS = ("print(value)", "printf(value)", "if value:\n    return value", "private_total = 0",
         "value = compute(total)", "return value")


def fake_candidates(prefix: str, n: int) -> list[str]:
    """Completions of the word being typed, or whole words at the start of one."""
    partial = prefix[partial_word_start(prefix, len(prefix)):]
    texts = [w[len(partial):] for w in WORDS if w.startswith(partial) and len(w) > len(partial)]
    return (texts or ["_fake(value)"])[:n]


class FakeEngine:
    """Decodes max_new_tokens 'steps' of step_ms each, checking the cancel token between steps."""

    def __init__(self, step_ms: float = 1.0):
        self.step_ms = step_ms
        self.requests: list[CompletionRequest] = []

    def describe(self) -> dict:
        return {"runtime": "fake", "step_ms": self.step_ms}

    def complete(self, request: CompletionRequest) -> Completion:
        self.requests.append(request)
        t0 = time.perf_counter()
        decode_deadline = request.decode_deadline(time.monotonic())
        opts = request.options
        steps = 0
        for steps in range(1, opts.max_new_tokens + 1):
            if request.cancel.cancelled:
                return Completion([], {"total": (time.perf_counter() - t0) * 1000.0}, tokens_generated=steps, cancelled=True)
            if time.monotonic() + self.step_ms / 1000.0 > decode_deadline:
                break
            time.sleep(self.step_ms / 1000.0)
        texts = fake_candidates(request.prefix, opts.n)
        if os.environ.get("CODECOMPLETE_FAKE_ECHO") == "paths":  # what the prompt would name the files
            texts = [request.path, *(nb.path for nb in request.neighbours)]
        candidates = [Candidate(text, score=1.0 - 0.1 * i, tokens=steps) for i, text in enumerate(texts)]
        return Completion(candidates, {"total": (time.perf_counter() - t0) * 1000.0}, tokens_generated=steps)


def fake_engine(model: str | None, runtime: str, device: str) -> FakeEngine:
    """Engine factory for `--engine-factory codecomplete.lsp.testing:fake_engine`."""
    from codecomplete.models.format.folder import ModelLoadError

    time.sleep(float(os.environ.get("CODECOMPLETE_FAKE_LOAD_MS", "0")) / 1000.0)
    if os.environ.get("CODECOMPLETE_FAKE_PRINT"):  # a chatty library: must not reach the LSP channel
        print("fake engine: loading", flush=True)
        os.write(1, b"fake engine: native code writing to fd 1\n")
    if model is not None and not Path(model).is_dir():
        raise ModelLoadError(f"{model}: no such model folder")
    step_ms = float(os.environ.get("CODECOMPLETE_FAKE_STEP_MS", "1"))
    if model is not None and (Path(model) / "fake_step_ms").is_file():
        step_ms = float((Path(model) / "fake_step_ms").read_text())
    return FakeEngine(step_ms=step_ms)


def write_raw(client, body: bytes) -> None:
    """Write one framed message of arbitrary bytes to a pygls client's server (garbage tests)."""
    header = f"Content-Length: {len(body)}\r\n\r\n".encode("ascii")
    client.protocol.writer.write(header + body)


FAULT_MARKER = "CODECOMPLETE_FAULT:"  # in a document: the faulty engine's process dies of that signal


class FaultyEngine(FakeEngine):
    """The fake engine, except that a document holding FAULT_MARKER + a signal name
    (CODECOMPLETE_FAULT:SIGFPE) kills its process with that signal, as a crashing native
    runtime would."""

    def complete(self, request: CompletionRequest) -> Completion:
        at = request.text.find(FAULT_MARKER)
        if at >= 0:
            import signal

            name = request.text[at + len(FAULT_MARKER):].split(None, 1)[0]
            os.kill(os.getpid(), getattr(signal, name, signal.SIGSEGV))
            time.sleep(5.0)  # a signal that does not kill at once still never answers
        return super().complete(request)


def faulty_engine(model: str | None, runtime: str, device: str) -> FaultyEngine:
    """Engine factory for `--engine-factory codecomplete.lsp.testing:faulty_engine`; a model
    folder holding a file `fault_on_load` names a signal its process dies of while loading."""
    engine = fake_engine(model, runtime, device)
    if model is not None and (Path(model) / "fault_on_load").is_file():
        import signal

        os.kill(os.getpid(), getattr(signal, (Path(model) / "fault_on_load").read_text().strip()))
        time.sleep(5.0)
    return FaultyEngine(step_ms=engine.step_ms)
