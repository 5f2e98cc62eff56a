"""Offline and private: no outgoing connections, no listening sockets in stdio mode, no pickle,
and nothing from the user's document in the log at the default level."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from codecomplete.bench.soak import RawServer

FAKE = ["--engine-factory", "codecomplete.lsp.testing:fake_engine"]
CTX = {"triggerKind": 1}

NETWORK_GUARD = '''
import os, socket
_log = os.environ["NETWORK_ATTEMPTS_FILE"]

def _record(what):
    with open(_log, "a") as f:
        f.write(repr(what) + "\\n")

def _local(address):
    host = address[0] if isinstance(address, tuple) else address
    return isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1"))

_connect = socket.socket.connect
def connect(self, address):
    if self.family != socket.AF_UNIX and not _local(address):
        _record(("connect", address))
        raise OSError("network blocked")
    return _connect(self, address)
socket.socket.connect = connect
socket.socket.connect_ex = lambda self, address: connect(self, address) or 0

_getaddrinfo = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
    if not _local((host,)):
        _record(("getaddrinfo", host))
        raise OSError("network blocked")
    return _getaddrinfo(host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo
'''


def test_cli_complete_makes_no_network_attempt(tiny_model_dir, tmp_path):
    (tmp_path / "guard").mkdir()
    (tmp_path / "guard" / "sitecustomize.py").write_text(NETWORK_GUARD)
    attempts = tmp_path / "attempts.txt"
    source = tmp_path / "main.py"
    source.write_text("def show(value):\n    pri\n")
    env = {**os.environ, "NETWORK_ATTEMPTS_FILE": str(attempts),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "guard"), os.environ.get("PYTHONPATH")]))}
    for extra in (["--model", str(tiny_model_dir)], []):  # a given model folder, then the shipped one
        proc = subprocess.run([sys.executable, "-m", "codecomplete", "complete", str(source), "--line", "1",
                               "--character", "7", "--n", "1", "--max-tokens", "4", *extra],
                              capture_output=True, text=True, env=env, timeout=180)
        assert proc.returncode == 0, proc.stderr
    assert not attempts.exists(), attempts.read_text()


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _listening(pid: int) -> list[tuple[str, str]]:
    """(local address hex, table) of the process's TCP sockets in LISTEN and bound UDP sockets."""
    mine = _socket_inodes(pid)
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[9] in mine and (cols[3] == "0A" or table.startswith("udp")):
                found.append((cols[1], table))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_stdio_server_opens_no_listening_socket():
    server = RawServer(FAKE)
    try:
        assert server.initialize(timeout_s=60) == "ready"
        assert _listening(server.pid) == []
    finally:
        server.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_tcp_mode_binds_loopback_only_by_default():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "codecomplete.lsp", *FAKE, "--tcp", str(port)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        listening = []
        for _ in range(300):
            listening = _listening(proc.pid)
            if listening:
                break
            time.sleep(0.05)
        assert listening == [(f"0100007F:{port:04X}", "tcp")]
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_loading_the_default_model_never_unpickles(monkeypatch, runtime):
    import pickle

    import torch

    from codecomplete.engine import Engine

    def banned(*args, **kwargs):
        raise AssertionError("unpickling while loading a model")

    for name in ("load", "loads"):  # (pickle.Unpickler stays: torch subclasses it at import)
        monkeypatch.setattr(pickle, name, banned)
    monkeypatch.setattr(torch, "load", banned)
    engine = Engine.load(None, runtime=runtime, device="cpu")
    assert engine.describe()["runtime"]


def test_document_text_never_reaches_the_log_at_the_default_level(tiny_model_dir):
    marker = "zq_secret_marker_7341"
    server = RawServer(["--model", str(tiny_model_dir)])  # the real engine, default --log-level
    uri = "file:///project/private.py"
    try:
        assert server.initialize({"candidates": 2, "maxTokens": 4}, timeout_s=120) == "ready"
        text = f"API_KEY = '{marker}'\n\ndef show(value):\n    pri\n"
        server.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1,
                                                                "text": text}})
        server.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": 2}, "contentChanges": [
            {"range": {"start": {"line": 99, "character": 0}, "end": {"line": 99, "character": 0}}, "text": marker}]})
        for i, (line, character) in enumerate([(3, 7), (0, 12), (50, 0), (3, 2000)]):
            server.request(i, "textDocument/inlineCompletion", {"textDocument": {"uri": uri},
                                                                "position": {"line": line, "character": character},
                                                                "context": CTX})
            assert server.response(i, 60) is not None
    finally:
        server.close()
    logged = [str(n.get("params")) for n in server.notifications if n.get("method") in
              ("window/logMessage", "window/showMessage")]
    assert [line for line in server.stderr_lines + logged if marker in line] == []
