"""Typing replay through the real server over stdio: per-keystroke latency as an editor sees it.

The server is spawned as `python -m codecomplete.lsp`; the file's text before the replay
region is opened (plus the text after it with keep_suffix), then each character of the
region is typed as an editor sends it: didChange with one inserted character, then
textDocument/inlineCompletion at the new cursor. Latency is measured from sending the
request to receiving its answer. `codecomplete bench latency --lsp` calls run_lsp_replay.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from lsprotocol import types
from pygls.lsp.client import LanguageClient

from codecomplete.bench.common import percentile

from .documents import UTF16, Document


def default_start(text: str, keystrokes: int) -> int:
    """A line start near the middle of the file with room for the keystrokes after it."""
    middle = max(0, min(len(text) // 2, len(text) - keystrokes))
    line_start = text.rfind("\n", 0, middle) + 1
    return line_start if len(text) - line_start >= keystrokes else middle


async def _replay(text: str, uri: str, language: str, start: int, keystrokes: int, settings: dict,
                  server_cmd: list[str], interval_ms: float, load_timeout_s: float, keep_suffix: bool) -> dict[str, Any]:
    client = LanguageClient("codecomplete-replay", "1")
    statuses: list = []
    messages: list = []
    client.feature("codecomplete/status")(lambda ls, params: statuses.append(params))
    client.feature(types.WINDOW_LOG_MESSAGE)(lambda ls, params: None)
    client.feature(types.WINDOW_SHOW_MESSAGE)(lambda ls, params: messages.append(params.message))
    await client.start_io(*server_cmd)
    t_load = time.perf_counter()
    try:
        folder = uri.rsplit("/", 1)[0]  # the file's folder is the workspace: the bench engine names it alike
        await client.initialize_async(types.InitializeParams(
            capabilities=types.ClientCapabilities(), initialization_options={"codecomplete": settings},
            root_uri=folder, workspace_folders=[types.WorkspaceFolder(uri=folder, name=folder.rsplit("/", 1)[1])]))
        client.initialized(types.InitializedParams())
        while not any(s.state in ("ready", "error") for s in statuses):
            if time.perf_counter() - t_load > load_timeout_s:
                raise TimeoutError(f"the model did not load within {load_timeout_s} s")
            await asyncio.sleep(0.01)
        load_ms = (time.perf_counter() - t_load) * 1000.0
        if statuses[-1].state == "error":
            client.exit(None)  # no shutdown first: the server exits at once (code 1)
            raise RuntimeError(f"the server could not load the model: {' '.join(messages) or statuses[-1]}")

        region = text[start:start + keystrokes]
        doc = Document(uri, language, 1, text[:start] + (text[start + len(region):] if keep_suffix else ""))
        client.text_document_did_open(types.DidOpenTextDocumentParams(text_document=types.TextDocumentItem(
            uri=uri, language_id=language, version=1, text=doc.text)))
        cursor = start
        latencies: list[float] = []
        per_key: list[dict] = []
        pending: list[asyncio.Future] = []
        counts = {"answered": 0, "empty": 0, "errors": 0, "items": 0}

        async def request(position: types.Position, offset: int) -> None:
            t0 = time.perf_counter()
            seen = len(statuses)
            try:
                result = await client.text_document_inline_completion_async(types.InlineCompletionParams(
                    text_document=types.TextDocumentIdentifier(uri=uri), position=position,
                    context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic)))
            except Exception:
                counts["errors"] += 1
                return
            ms = (time.perf_counter() - t0) * 1000.0
            latencies.append(ms)
            if interval_ms <= 0:  # one request at a time: its status (sent before the answer) is the newest
                await asyncio.sleep(0)
                sources = [s.source for s in statuses[seen:] if getattr(s, "source", None)]
                per_key.append({"offset": offset, "ms": ms, "source": sources[-1] if sources else "none"})
            items = list(getattr(result, "items", None) or [])
            counts["answered" if items else "empty"] += 1
            counts["items"] += len(items)

        for version, ch in enumerate(region, start=2):
            position = doc.position_at(cursor, UTF16)
            edit = types.TextDocumentContentChangePartial(range=types.Range(start=position, end=position), text=ch)
            doc.apply_change(edit, UTF16)
            cursor += 1
            client.text_document_did_change(types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version), content_changes=[edit]))
            task = asyncio.ensure_future(request(doc.position_at(cursor, UTF16), cursor))
            if interval_ms > 0:  # typing at a fixed rate: newer requests supersede older ones
                pending.append(task)
                await asyncio.sleep(interval_ms / 1000.0)
            else:
                await task
        await asyncio.gather(*pending)
        server_ms = [s.latencyMs for s in statuses if getattr(s, "latencyMs", None) is not None]
        await client.shutdown_async(None)
        client.exit(None)
    finally:
        server = client._server  # pygls keeps the process here; stop() only waits for it
        if server is not None and server.returncode is None:
            try:
                await asyncio.wait_for(server.wait(), timeout=5.0)
            except asyncio.TimeoutError:
                server.kill()
        await client.stop()
    n = len(latencies)
    by_source: dict[str, list[float]] = {}
    for k in per_key:
        by_source.setdefault(k["source"], []).append(k["ms"])
    return {
        "requests": n + counts["errors"], "answered": counts["answered"], "empty": counts["empty"],
        "errors": counts["errors"], "items_mean": counts["items"] / n if n else 0.0,
        "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
        "mean_ms": statistics.fmean(latencies) if latencies else float("nan"),
        "max_ms": max(latencies) if latencies else float("nan"),
        "server_p50_ms": percentile(server_ms, 50), "load_ms": load_ms, "latencies_ms": latencies,
        # per kind of answer (sequential replays only): "warm" = the model ran with its prefix KV
        # reused, "cache" = typing-as-suggested, "cold" = a full prefill, "none" = no model answer
        "by_source": {k: {"count": len(v), "p50_ms": percentile(v, 50), "p95_ms": percentile(v, 95)}
                      for k, v in sorted(by_source.items())},
        "warm_p50_ms": percentile(by_source.get("warm", []), 50),
        "warm_p95_ms": percentile(by_source.get("warm", []), 95),
        "keystrokes": per_key,
    }


def run_lsp_replay(path: str | Path, language: str, n: int, max_tokens: int, keystrokes: int, *,
                   model: str | None = None, runtime: str = "onnx", device: str = "cpu",
                   deadline_ms: int = 1000, multiline: str = "auto", start: int | None = None, interval_ms: float = 0.0,
                   keep_suffix: bool = False, engine_factory: str | None = None,
                   load_timeout_s: float = 300.0) -> dict[str, Any]:
    """Replay typing `keystrokes` characters of a file through the server; latency percentiles.

    start: where typing begins (default: a line start near the middle). interval_ms: 0 waits
    for each answer before the next keystroke; > 0 types at that pace, so newer requests
    supersede older ones as in a real editor. engine_factory: MODULE:NAME for the server
    (tests use codecomplete.lsp.testing:fake_engine).
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    start = default_start(text, keystrokes) if start is None else start
    cmd = [sys.executable, "-P", "-m", "codecomplete.lsp", "--runtime", runtime, "--device", device, "--log-level", "WARNING"]
    if model:
        cmd += ["--model", str(model)]
    if engine_factory:
        cmd += ["--engine-factory", engine_factory]
    settings = {"candidates": n, "maxTokens": max_tokens, "deadlineMs": deadline_ms, "multiline": multiline}
    result = asyncio.run(_replay(text, path.resolve().as_uri(), language, start, keystrokes, settings, cmd,
                                 interval_ms, load_timeout_s, keep_suffix))
    return {"path": str(path), "language": language, "n": n, "max_tokens": max_tokens, "keystrokes": keystrokes,
            "start": start, "model": model or "default", "runtime": runtime, "device": device,
            "deadline_ms": deadline_ms, "multiline": multiline, "interval_ms": interval_ms, **result}
