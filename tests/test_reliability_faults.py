"""Faults: broken model files, an engine that raises, a client that vanishes.

Each must end in a clear one-line message (exit code 3 for the CLI) or an answer, never a
traceback on stdout and never a hang.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codecomplete.bench.soak import RawServer

FAKE = ["--engine-factory", "codecomplete.lsp.testing:fake_engine"]
CTX = {"triggerKind": 1}
URI = "file:///project/main.py"
TEXT = "def show(value):\n    pri\n"


def break_model(src: Path, dst: Path, how: str) -> Path:
    """A copy of a model folder with one fault."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    weights = dst / "model.safetensors"
    data = weights.read_bytes()
    if how == "missing-weights":
        weights.unlink()
    elif how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "corrupt-header":
        weights.write_bytes((2**40).to_bytes(8, "little") + b"{not json" + data[17:])
    elif how == "garbage-config":
        (dst / "config.json").write_text("{ this is not json")
    elif how == "empty-weights":
        weights.write_bytes(b"")
    return dst


@pytest.mark.parametrize("how", ["missing-folder", "missing-weights", "truncated", "corrupt-header",
                                 "garbage-config", "empty-weights"])
def test_cli_with_a_broken_model_exits_3_with_one_line(tiny_model_dir, tmp_path, how):
    model = tmp_path / "nothing-here" if how == "missing-folder" else break_model(tiny_model_dir, tmp_path / how, how)
    source = tmp_path / "main.py"
    source.write_text(TEXT)
    proc = subprocess.run([sys.executable, "-m", "codecomplete", "complete", str(source), "--line", "1",
                           "--character", "7", "--model", str(model), "--n", "1", "--max-tokens", "4"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "cannot load the model" in proc.stderr, proc.stderr


def test_server_with_a_truncated_model_answers_empty_and_exits_cleanly(tiny_model_dir, tmp_path):
    model = break_model(tiny_model_dir, tmp_path / "truncated", "truncated")
    server = RawServer(["--model", str(model)])
    try:
        assert server.initialize(timeout_s=120) == "error"
        server.notify("textDocument/didOpen", {"textDocument": {"uri": URI, "languageId": "python", "version": 1,
                                                                "text": TEXT}})
        server.request(1, "textDocument/inlineCompletion",
                       {"textDocument": {"uri": URI}, "position": {"line": 1, "character": 7}, "context": CTX})
        assert server.response(1)["result"]["items"] == []
        shown = [n["params"]["message"] for n in server.notifications if n.get("method") == "window/showMessage"]
        assert len(shown) == 1 and "could not load" in shown[0]
    finally:
        assert server.close() == 0
    assert not server.stdout_garbage
    assert "Traceback" not in "".join(server.stderr_lines)


RAISING_ENGINE = '''
from codecomplete.lsp.testing import FakeEngine

class RaisingEngine(FakeEngine):
    def complete(self, request):
        if "boom" in request.prefix:
            raise RuntimeError("engine exploded")
        return super().complete(request)

def factory(model, runtime, device):
    return RaisingEngine(step_ms=1.0)
'''


def test_an_exception_in_the_worker_is_logged_and_the_server_keeps_answering(tmp_path):
    (tmp_path / "raising_engine.py").write_text(RAISING_ENGINE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    server = RawServer(["--engine-factory", "raising_engine:factory"], env=env)
    try:
        assert server.initialize(timeout_s=60) == "ready"
        server.notify("textDocument/didOpen", {"textDocument": {"uri": URI, "languageId": "python", "version": 1,
                                                                "text": "boom\n" + TEXT}})
        server.request(1, "textDocument/inlineCompletion",
                       {"textDocument": {"uri": URI}, "position": {"line": 0, "character": 4}, "context": CTX})
        first = server.response(1)
        assert first is not None and ("error" in first or first["result"]["items"] == [])
        server.request(2, "textDocument/inlineCompletion",
                       {"textDocument": {"uri": URI}, "position": {"line": 2, "character": 7}, "context": CTX})
        assert server.response(2) is not None  # "boom" is in the prefix here too: answered all the same
        server.notify("textDocument/didOpen", {"textDocument": {"uri": "file:///ok.py", "languageId": "python",
                                                                "version": 1, "text": TEXT}})
        server.request(3, "textDocument/inlineCompletion",
                       {"textDocument": {"uri": "file:///ok.py"}, "position": {"line": 1, "character": 7},
                        "context": CTX})
        assert server.response(3)["result"]["items"][0]["insertText"] == "nt(value)"
    finally:
        assert server.close() == 0
    assert not server.stdout_garbage
    assert "engine exploded" in "".join(server.stderr_lines)


def test_server_exits_when_the_client_closes_its_pipes_mid_request():
    env = {**os.environ, "CODECOMPLETE_FAKE_STEP_MS": "200"}
    server = RawServer(FAKE, env=env)
    assert server.initialize(timeout_s=60) == "ready"
    server.notify("textDocument/didOpen", {"textDocument": {"uri": URI, "languageId": "python", "version": 1,
                                                            "text": TEXT}})
    server.request(1, "textDocument/inlineCompletion",
                   {"textDocument": {"uri": URI}, "position": {"line": 1, "character": 7}, "context": CTX})
    time.sleep(0.3)  # a slow completion is running when the client goes
    server.proc.stdin.close()
    try:
        code = server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        pytest.fail("the server did not exit after its client vanished")
    assert code == 1  # no shutdown came first: the LSP rule says exit code 1


def test_server_exits_when_nobody_reads_its_answers():
    from codecomplete.bench.soak import frame

    proc = subprocess.Popen([sys.executable, "-m", "codecomplete.lsp", *FAKE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdout.close()  # the reader is gone before the first answer
    try:
        proc.stdin.write(frame(b'{"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}}}'))
        proc.stdin.flush()
        time.sleep(1.0)  # the answer hits the closed pipe
        proc.stdin.close()
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the server hung writing to a closed pipe")
    except BrokenPipeError:
        code = proc.wait(timeout=30)
    assert code in (0, 1)  # it exited (how is not the point: it did not hang or crash with a signal)
