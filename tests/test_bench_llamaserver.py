"""`bench llamaserver` against a fake llama-server (a small HTTP server answering /health and
/infill): the command line it is started with, the llama.vim request shape, and the JSON
report, without building llama.cpp."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

from codecomplete.bench.llamaserver import infill_request, server_command
from codecomplete.cli import main as cli_main

FAKE_SERVER = '''#!{python}
"""A stand-in llama-server: records its argv and every /infill body to $FAKE_LLAMA_LOG."""
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer

args = sys.argv[1:]
if args == ["--version"]:
    print("version: 0 (fake)")
    sys.exit(0)
log = open(os.environ["FAKE_LLAMA_LOG"], "a")
log.write(json.dumps({{"argv": args}}) + "\\n")
log.flush()
port = int(args[args.index("--port") + 1])
started = time.monotonic()

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _json(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            loading = time.monotonic() - started < 0.3
            return self._json(503 if loading else 200, {{"status": "loading model" if loading else "ok"}})
        self._json(404, {{}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        log.write(json.dumps({{"path": self.path, "body": body}}) + "\\n")
        log.flush()
        one = {{"content": "x = 1", "timings/prompt_n": 900 if not body["cache_prompt"] else 3,
               "timings/prompt_ms": 5.0, "timings/predicted_n": 4, "timings/predicted_ms": 2.0,
               "truncated": False, "tokens_cached": 0 if not body["cache_prompt"] else 897}}
        n = body.get("n_cmpl", 1)
        self._json(200, one if n == 1 else [one] * n)

HTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


def _fake_server(tmp_path: Path) -> Path:
    path = tmp_path / "llama-server"
    path.write_text(FAKE_SERVER.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_request_is_llama_vims_infill_body():
    text = "import os\n\ndef f(x):\n    return x\n\nprint(f(1))\n"
    offset = text.index("return x") + len("ret")
    body = infill_request(text, offset, n=4, max_tokens=16, deadline_ms=2000, single_line=True)
    assert body["input_prefix"] == "import os\n\ndef f(x):\n"
    assert body["prompt"] == "    ret"
    assert body["input_suffix"] == "urn x\n\nprint(f(1))\n\n"
    assert body["n_indent"] == 4 and body["n_predict"] == 16 and body["n_cmpl"] == 4
    assert body["cache_prompt"] is True and body["input_extra"] == []
    assert body["samplers"] == ["top_k", "top_p", "infill"] and body["stop"] == ["\n"]
    assert body["t_max_predict_ms"] == 2000
    one = infill_request(text, offset, n=1, max_tokens=16, deadline_ms=2000, single_line=False)
    assert "n_cmpl" not in one and "stop" not in one


def test_blank_cursor_line_starts_from_the_line_beginning():
    text = "a = 1\n    \nb = 2\n"
    body = infill_request(text, text.index("    ") + 2, n=1, max_tokens=8, deadline_ms=500, single_line=True)
    assert body["prompt"] == "" and body["n_indent"] == 0 and body["input_suffix"].startswith("\nb = 2")


def test_server_is_started_as_llama_vscode_documents(tmp_path):
    command = server_command("llama-server", tmp_path / "m.gguf", 8012, threads=2, slots=4, batch=1024, extra=[])
    joined = " ".join(command)
    assert f"-m {tmp_path / 'm.gguf'}" in joined
    for flag in ("-ngl 0", "-ub 1024", "-b 1024", "--ctx-size 0", "--cache-reuse 256", "-t 2", "-tb 2", "-np 4"):
        assert flag in joined


def test_bench_replays_through_the_fake_server_and_the_engine(tmp_path, tiny_model_dir, capsys, monkeypatch):
    log = tmp_path / "fake.jsonl"
    monkeypatch.setenv("FAKE_LLAMA_LOG", str(log))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")  # the fake never reads it; our engine gets --engine-model
    code = cli_main(["bench", "llamaserver", "--model", str(gguf), "--engine-model", str(tiny_model_dir),
                     "--server", str(_fake_server(tmp_path)), "--threads", "1", "--keystrokes", "4",
                     "--cold", "1", "--n", "1,2", "--max-tokens", "4", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    argv = entries[0]["argv"]
    assert argv[argv.index("-m") + 1] == str(gguf) and argv[argv.index("-np") + 1] == "2"
    bodies = [e["body"] for e in entries[1:]]
    assert all(e["path"] == "/infill" for e in entries[1:])
    # per N: one cold, the priming request after forget (also cold), then 4 warm keystrokes
    assert len(bodies) == 2 * (1 + 1 + 4)
    assert [b["cache_prompt"] for b in bodies[:6]] == [False, False, True, True, True, True]
    assert all("n_cmpl" not in b for b in bodies[:6]) and all(b["n_cmpl"] == 2 for b in bodies[6:])
    assert all(b["n_predict"] == 4 and b["stop"] == ["\n"] for b in bodies)
    assert set(result["runs"]) == {"1", "2"}
    for by_system in result["runs"].values():
        assert set(by_system) == {"llama-server", "codecomplete (auto)"}
        assert by_system["llama-server"]["warm_requests"] == 4
        assert by_system["llama-server"]["warm_prefill_new_tokens_p50"] == 3
        assert by_system["llama-server"]["cold_p50_ms"] > 0
    assert {(r["system"], r["n"]) for r in result["ratios"]} == {("codecomplete (auto)", 1), ("codecomplete (auto)", 2)}
    assert result["llama_server"]["command"][0] == "llama-server"
    assert result["llama_server"]["version"] == "version: 0 (fake)"
    assert result["llama_server"]["after_replay"]["peak_rss_mb"] > 0
    assert result["engines"]["codecomplete (auto)"]["after_replay"]["peak_rss_mb"] > 0


def test_missing_server_or_gguf_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CODECOMPLETE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cli_main(["bench", "llamaserver", "--model", str(tmp_path / "none.gguf")]) == 2
    assert "no GGUF file" in capsys.readouterr().err
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert cli_main(["bench", "llamaserver", "--model", str(gguf)]) == 2
    assert "--build" in capsys.readouterr().err
