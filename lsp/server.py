"""codecomplete-lsp: the language server. It translates LSP <-> engine and schedules; nothing more.

    codecomplete-lsp                      # stdio
    codecomplete-lsp --tcp 127.0.0.1:2087 # or a TCP port (127.0.0.1 unless a host is given)
    codecomplete-lsp --model DIR --runtime torch --device cpu
    codecomplete-lsp --check --model DIR  # load the model, report, exit 0 / 1

Features: textDocument/inlineCompletion (each candidate an item with insertText + range),
textDocument/completion (menu items with text edits), incremental sync, UTF-8 / UTF-16
positions, settings from initializationOptions and workspace/didChangeConfiguration
(settings.py), `codecomplete/status` notifications, work-done progress while loading.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams
from pygls.lsp.server import LanguageServer
from pygls.uris import to_fs_path

from codecomplete.prompt import workspace_name
from codecomplete.request import CancelToken, Completion, CompletionRequest, Neighbour

from . import items as lsp_items
from .documents import Document, Documents, PositionError
from .protocol import CodecompleteProtocol
from .settings import SECTION, Settings, apply_settings, section_of
from .worker import EngineFactory, Worker, default_engine_factory

logger = logging.getLogger("codecomplete.lsp")

STATUS_METHOD = "codecomplete/status"
MAX_DOCUMENT_CHARS = 4_000_000  # bigger documents get empty answers
WINDOW_BEFORE_CHARS = 64_000  # the engine sees at most this much text before the cursor...
WINDOW_AFTER_CHARS = 16_000  # ...and this much after it
NEIGHBOUR_CHARS = 32_000  # per other open document
MAX_NEIGHBOURS = 8
NVIM_RUNTIME = Path(__file__).resolve().parent / "nvim"  # holds lua/codecomplete/init.lua
PARENT_POLL_S = float(os.environ.get("CODECOMPLETE_PARENT_POLL_S", "2"))  # seconds between checks

try:
    from importlib.metadata import version as _version

    __version__ = _version("codecomplete")
except Exception:  # not installed: running from a checkout
    __version__ = "0.0.0"


# -- pure helpers -------------------------------------------------------------------------
def text_window(text: str, offset: int, before: int = WINDOW_BEFORE_CHARS,
                after: int = WINDOW_AFTER_CHARS) -> tuple[str, int]:
    """(window, offset in it): the text around the cursor that the engine gets.

    The edges move in steps of a quarter window and sit on line starts, so that while the
    user types they stay put and the engine's cached prompt stays valid.
    """
    if len(text) <= before + after:
        return text, offset
    step_before, step_after = max(before // 4, 1), max(after // 4, 1)
    start = max(0, -(-(offset - before) // step_before) * step_before)
    line_start = text.find("\n", start, offset)
    if start > 0 and line_start >= 0:
        start = line_start + 1
    end = min(len(text), (offset + after) // step_after * step_after)
    line_end = text.rfind("\n", offset, end)
    if end < len(text) and line_end >= 0:
        end = line_end + 1
    end = max(end, offset)
    return text[start:end], offset - start


def clean_text(text: str) -> str | None:
    """The text as the engine may see it; None for binary content (NUL bytes)."""
    if "\x00" in text:
        return None
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:  # lone surrogates (from JSON escapes): one "?" each, offsets stay
        return text.encode("utf-8", "replace").decode("utf-8")


def path_of(uri: str) -> str:
    try:
        return to_fs_path(uri) or uri
    except Exception:
        return uri


def prompt_path(uri: str, roots: list[str]) -> str:
    """The name the prompt gives the document at uri (see prompt.workspace_name); roots are
    the workspace folders' URIs. A document with no file (untitled:Untitled-1) keeps its name."""
    path = path_of(uri)
    if path == uri and "://" not in uri and ":" in uri:
        return uri.split(":", 1)[1]
    return workspace_name(path, [path_of(r) for r in roots])


def process_alive(pid: int) -> bool:
    """Whether a process exists (and is not a zombie)."""
    if sys.platform == "win32":  # os.kill(pid, 0) would terminate it on Windows
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return bool(ok) and code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


@dataclass
class Prepared:
    """A completion request ready for the worker, with the document it was made from."""

    doc: Document  # a snapshot: later edits do not move the answer's positions
    offset: int
    request: CompletionRequest


# -- the server -----------------------------------------------------------------------------
class CodecompleteServer(LanguageServer):
    """Documents, settings and the worker that owns the engine."""

    protocol: CodecompleteProtocol

    def __init__(self, engine_factory: EngineFactory = default_engine_factory,
                 defaults: Settings | None = None, default_model: str | None = None):
        super().__init__("codecomplete", __version__, protocol_cls=CodecompleteProtocol,
                         text_document_sync_kind=types.TextDocumentSyncKind.Incremental)
        self.engine_factory = engine_factory
        self.settings = defaults or Settings()
        self.default_model = default_model  # the server's "" model: --model, else the shipped one
        self.documents = Documents()
        self.worker: Worker | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.supports_progress = False
        self.supports_markdown = False
        self.supports_configuration = False
        self._latest: dict[str, Any] = {}  # uri -> the Job now being computed for it
        self._shown_errors: set[str] = set()
        self._skipped: set[str] = set()  # uris we already logged as too big / binary
        self._tasks: set[asyncio.Task] = set()
        self.exit_process = os._exit

    @property
    def encoding(self) -> str:
        return self.protocol.position_encoding

    # -- errors and messages ----------------------------------------------------------
    def report_server_error(self, error: Exception, source) -> None:
        """Protocol garbage goes to the log, never into a popup."""
        logger.warning("protocol error (%s): %s", getattr(source, "__name__", source), error)

    def show_error_once(self, message: str) -> None:
        logger.error("%s", message)
        if message not in self._shown_errors:
            self._shown_errors.add(message)
            self.window_show_message(types.ShowMessageParams(type=types.MessageType.Error, message=message))

    def notify_status(self, state: str, message: str | None = None, latency_ms: float | None = None,
                      source: str | None = None) -> None:
        params: dict[str, Any] = {"state": state}
        if message is not None:
            params["message"] = message
        if latency_ms is not None:
            params["latencyMs"] = round(latency_ms, 1)
        if source is not None:  # "cache" (typing-as-suggested), "warm" (prefix KV reused) or "cold"
            params["source"] = source
        self.protocol.notify(STATUS_METHOD, params)

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- settings and the engine ------------------------------------------------------
    def update_settings(self, raw: Any, source: str) -> None:
        new, errors = apply_settings(self.settings, raw)
        for error in errors:
            logger.warning("%s: %s", source, error)
            self.window_show_message(types.ShowMessageParams(type=types.MessageType.Warning,
                                                             message=f"codecomplete: {error}"))
        old, self.settings = self.settings, new
        if new != old:
            logger.info("settings from %s: %s", source, new)
        if self.worker is not None and new.engine_key != old.engine_key:
            self.spawn(self.load_engine())

    async def load_engine(self) -> None:
        """(Re)load the engine in the worker, with progress and status notifications."""
        assert self.worker is not None
        s = self.settings
        model = s.model or self.default_model
        what = f"{model or 'the default model'} ({s.runtime}, {s.device})"
        self.notify_status("loading", f"loading {what}")
        pending = self.worker.load(model, s.runtime, s.device)
        token = await self._begin_progress(f"loading {what}")
        result = await pending
        if token is not None:
            self.work_done_progress.end(token, types.WorkDoneProgressEnd(
                message="ready" if result.ok else "failed"))
        if result.superseded:
            return
        if result.ok:
            logger.info("loaded %s in %.0f ms: %s", what, result.elapsed_ms, result.message)
            self.notify_status("ready", f"{what} loaded in {result.elapsed_ms:.0f} ms")
            return
        # Settings that fail to load fall back to what is still loaded.
        if self.worker.engine_key is not None:
            model_key, runtime, device = self.worker.engine_key
            self.settings = replace(self.settings, runtime=runtime, device=device,
                                    model="" if model_key == self.default_model else (model_key or ""))
        self.show_error_once(f"codecomplete: could not load {what}: {result.message}")
        self.notify_status("ready" if self.worker.ready else "error", result.message)

    async def _begin_progress(self, message: str) -> str | None:
        if not self.supports_progress:
            return None
        token = f"codecomplete-load-{uuid.uuid4()}"
        try:
            await asyncio.wait_for(self.work_done_progress.create_async(token), timeout=5.0)
        except Exception as e:  # the client refused or never answered: no progress then
            logger.debug("no work-done progress: %s", e)
            return None
        self.work_done_progress.begin(token, types.WorkDoneProgressBegin(title="codecomplete", message=message))
        return token

    def start_worker(self) -> None:
        if self.worker is None:
            self.loop = asyncio.get_running_loop()
            self.worker = Worker(self.engine_factory, self.loop)
            self.spawn(self.load_engine())

    # -- completion -------------------------------------------------------------------
    def prepare(self, uri: str, position: types.Position) -> Prepared | None:
        """The engine request for a cursor, or None when the answer is empty anyway."""
        doc = self.documents.get(uri)
        if doc is None:
            logger.info("completion for %s, which is not open: empty answer", uri)
            return None
        try:
            offset = doc.offset_at(position, self.encoding)
        except PositionError as e:
            raise JsonRpcInvalidParams(str(e)) from None
        if not self.settings.enabled_for(doc.language_id):
            return None
        if len(doc.text) > MAX_DOCUMENT_CHARS:
            self._log_skip(uri, f"{uri} has {len(doc.text)} characters (limit {MAX_DOCUMENT_CHARS}): no completions")
            return None
        window, window_offset = text_window(doc.text, offset)
        text = clean_text(window)
        if text is None:
            self._log_skip(uri, f"{uri} looks binary (NUL characters): no completions")
            return None
        request = CompletionRequest(text=text, offset=window_offset, language=doc.language_id,
                                    path=prompt_path(uri, self.workspace_roots()), neighbours=self._neighbours(uri),
                                    options=self.settings.completion_options(), cancel=CancelToken())
        snapshot = Document(doc.uri, doc.language_id, doc.version, doc.text, doc._line_starts)
        return Prepared(snapshot, offset, request)

    def _log_skip(self, uri: str, message: str) -> None:
        if uri not in self._skipped:
            self._skipped.add(uri)
            logger.info("%s", message)

    def workspace_roots(self) -> list[str]:
        """The URIs of the open workspace folders (and the root the client named)."""
        try:
            ws = self.workspace
        except RuntimeError:  # before initialize
            return []
        roots = [f.uri for f in ws.folders.values()]
        if ws.root_uri and ws.root_uri not in roots:
            roots.append(ws.root_uri)
        return roots

    def _neighbours(self, uri: str) -> list[Neighbour]:
        out = []
        roots = self.workspace_roots()
        for other in self.documents.recent(exclude=uri, limit=MAX_NEIGHBOURS):
            text = clean_text(other.text[:NEIGHBOUR_CHARS])
            if text:
                out.append(Neighbour(prompt_path(other.uri, roots), text, other.language_id))
        return out

    async def run_completion(self, uri: str, position: types.Position) -> tuple[Prepared | None, Completion | None]:
        """Prepare, queue and await one completion; a newer request for uri supersedes it."""
        t0 = time.perf_counter()
        prepared = self.prepare(uri, position)
        if prepared is None:
            return None, None
        self.start_worker()
        assert self.worker is not None
        if not self.worker.ready:
            return prepared, None
        previous = self._latest.pop(uri, None)
        if previous is not None:
            previous.supersede()
        job = self.worker.complete(prepared.request, float(self.settings.deadline_ms))
        self._latest[uri] = job
        try:
            completion = await asyncio.wait_for(asyncio.shield(job.future), timeout=self.settings.deadline_ms / 1000.0)
        except asyncio.TimeoutError:
            logger.info("deadline (%d ms) passed for %s: empty answer", self.settings.deadline_ms, uri)
            completion = None
            job.supersede()
        except asyncio.CancelledError:  # $/cancelRequest or shutdown: stop decoding too
            job.supersede()
            raise
        finally:
            if self._latest.get(uri) is job:
                del self._latest[uri]
        if completion is not None and not completion.cancelled:
            self.notify_status("ready", latency_ms=(time.perf_counter() - t0) * 1000.0, source=completion.source)
        return prepared, completion

    def watch_parent(self, pid: int) -> None:
        async def poll() -> None:
            while True:
                await asyncio.sleep(PARENT_POLL_S)
                if not process_alive(pid):
                    logger.warning("the editor (process %d) is gone: exiting", pid)
                    sys.stderr.flush()
                    self.exit_process(0)
                    return

        self.spawn(poll())


# -- handlers -----------------------------------------------------------------------------------
def on_initialize(ls: CodecompleteServer, params: types.InitializeParams) -> None:
    caps = params.capabilities
    ls.supports_progress = bool(caps.window and caps.window.work_done_progress)
    ls.supports_configuration = bool(caps.workspace and caps.workspace.configuration)
    doc_formats = (caps.text_document and caps.text_document.completion and caps.text_document.completion.completion_item
                   and caps.text_document.completion.completion_item.documentation_format) or []
    ls.supports_markdown = types.MarkupKind.Markdown in doc_formats
    if params.initialization_options is not None:
        ls.update_settings(params.initialization_options, "initializationOptions")
    if params.process_id:
        ls.watch_parent(params.process_id)


def on_initialized(ls: CodecompleteServer, params: types.InitializedParams) -> None:
    ls.start_worker()


async def on_did_change_configuration(ls: CodecompleteServer, params: types.DidChangeConfigurationParams) -> None:
    raw = params.settings
    if not section_of(raw) and ls.supports_configuration:  # a "pull" client: ask for the section
        try:
            answer = await ls.workspace_configuration_async(
                types.ConfigurationParams(items=[types.ConfigurationItem(section=SECTION)]))
            raw = answer[0] if answer else None
        except Exception as e:
            logger.warning("workspace/configuration failed: %s", e)
            return
    ls.update_settings(raw, "workspace/didChangeConfiguration")


def on_did_open(ls: CodecompleteServer, params: types.DidOpenTextDocumentParams) -> None:
    ls.documents.open(params.text_document)


def on_did_change(ls: CodecompleteServer, params: types.DidChangeTextDocumentParams) -> None:
    if ls.documents.change(params, ls.encoding) is None:
        logger.info("didChange for %s, which is not open: ignored", params.text_document.uri)


def on_did_close(ls: CodecompleteServer, params: types.DidCloseTextDocumentParams) -> None:
    uri = params.text_document.uri
    ls.documents.close(uri)
    ls._skipped.discard(uri)
    job = ls._latest.pop(uri, None)
    if job is not None:
        job.supersede()


async def on_inline_completion(ls: CodecompleteServer, params: types.InlineCompletionParams) -> types.InlineCompletionList:
    prepared, completion = await ls.run_completion(params.text_document.uri, params.position)
    if prepared is None or completion is None:
        return types.InlineCompletionList(items=[])
    return types.InlineCompletionList(
        items=lsp_items.inline_items(prepared.doc, prepared.offset, completion.candidates, ls.encoding))


async def on_completion(ls: CodecompleteServer, params: types.CompletionParams) -> types.CompletionList:
    prepared, completion = await ls.run_completion(params.text_document.uri, params.position)
    if prepared is None or completion is None:
        return types.CompletionList(is_incomplete=True, items=[])
    items = lsp_items.completion_items(prepared.doc, prepared.offset, completion.candidates, ls.encoding,
                                       markdown=ls.supports_markdown)
    # Incomplete: the candidates depend on every character typed, so ask again as the user types.
    return types.CompletionList(is_incomplete=True, items=items)


def create_server(engine_factory: EngineFactory = default_engine_factory, defaults: Settings | None = None,
                  default_model: str | None = None) -> CodecompleteServer:
    """A server with every handler registered (the engine factory is injectable for tests)."""
    ls = CodecompleteServer(engine_factory, defaults, default_model)
    ls.feature(types.INITIALIZE)(on_initialize)
    ls.feature(types.INITIALIZED)(on_initialized)
    ls.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)(on_did_change_configuration)
    ls.feature(types.TEXT_DOCUMENT_DID_OPEN)(on_did_open)
    ls.feature(types.TEXT_DOCUMENT_DID_CHANGE)(on_did_change)
    ls.feature(types.TEXT_DOCUMENT_DID_CLOSE)(on_did_close)
    ls.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())(on_inline_completion)
    ls.feature(types.TEXT_DOCUMENT_COMPLETION,
               types.CompletionOptions(trigger_characters=[".", "("], resolve_provider=False))(on_completion)
    return ls


# -- process setup ------------------------------------------------------------------------------
class SafeStdin:
    """stdin for pygls: message bodies that are not valid UTF-8 get U+FFFD instead of vanishing."""

    def __init__(self, raw):
        self._raw = raw

    def readline(self) -> bytes:
        return self._raw.readline()

    def read(self, n: int) -> bytes:
        data = self._raw.read(n)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            logger.warning("a message that is not valid UTF-8 arrived: undecodable bytes replaced")
            data = data.decode("utf-8", "replace").encode("utf-8")
        return data


def claim_stdout():
    """The LSP channel: a private copy of fd 1. fd 1 and sys.stdout then go to stderr, so that
    a stray print (ours, a library's, a C extension's) cannot corrupt the protocol."""
    sys.stdout.flush()
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return channel


class ClientLogHandler(logging.Handler):
    """Forwards log records to the client as window/logMessage (from any thread)."""

    LEVELS = ((logging.ERROR, types.MessageType.Error), (logging.WARNING, types.MessageType.Warning),
              (logging.INFO, types.MessageType.Info))

    def __init__(self, server: CodecompleteServer, level: int = logging.INFO):
        super().__init__(level)
        self.server = server

    def emit(self, record: logging.LogRecord) -> None:
        loop = self.server.loop
        if loop is None or loop.is_closed():
            return
        kind = next((t for lvl, t in self.LEVELS if record.levelno >= lvl), types.MessageType.Log)
        params = types.LogMessageParams(type=kind, message=self.format(record))
        try:
            loop.call_soon_threadsafe(self._send, params)
        except RuntimeError:
            pass

    def _send(self, params: types.LogMessageParams) -> None:
        if self.server.protocol.writer is not None:
            self.server.window_log_message(params)


def _parse_tcp(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT or PORT, got {value!r}") from None


def _load_factory(spec: str) -> EngineFactory:
    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(prog="codecomplete-lsp", description="codecomplete language server (stdio by default)")
    p.add_argument("--stdio", action="store_true", help="talk LSP over stdin/stdout (the default)")
    p.add_argument("--tcp", type=_parse_tcp, metavar="HOST:PORT", help="listen on TCP instead (host 127.0.0.1 if omitted)")
    p.add_argument("--model", default=None, help="model folder, .gguf file or pulled model name (default: the shipped model)")
    p.add_argument("--runtime", choices=("onnx", "torch"), default=d.runtime)
    p.add_argument("--device", choices=("cpu", "cuda"), default=d.device)
    p.add_argument("--candidates", type=int, default=d.candidates)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--deadline-ms", type=int, default=d.deadline_ms)
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.add_argument("--check", action="store_true", help="load the model, print what loaded, exit 0 (or 1 with the error)")
    p.add_argument("--nvim-runtime", action="store_true",
                   help="print the folder to add to Neovim's 'runtimepath' for require('codecomplete'), then exit")
    p.add_argument("--engine-factory", default=None, metavar="MODULE:NAME",
                   help="for tests: a callable (model, runtime, device) -> engine instead of the real engine")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nvim_runtime:
        print(NVIM_RUNTIME)
        return 0
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="codecomplete-lsp %(levelname)s %(name)s: %(message)s")
    logging.getLogger("codecomplete").setLevel(args.log_level)
    factory = _load_factory(args.engine_factory) if args.engine_factory else default_engine_factory
    defaults, errors = apply_settings(Settings(), {"runtime": args.runtime, "device": args.device,
                                                   "candidates": args.candidates, "maxTokens": args.max_tokens,
                                                   "deadlineMs": args.deadline_ms})
    for error in errors:
        print(f"codecomplete-lsp: {error}", file=sys.stderr)
    if args.check:
        return _check(factory, args.model, defaults)
    channel = claim_stdout() if args.tcp is None else None
    server = create_server(factory, defaults, default_model=args.model)
    logging.getLogger("codecomplete").addHandler(ClientLogHandler(server))
    if args.tcp is not None:
        server.start_tcp(*args.tcp)
    else:
        server.start_io(SafeStdin(sys.stdin.buffer), channel)
    code = 0 if server.protocol._shutdown else 1  # the LSP rule: exit without shutdown is an error
    sys.stderr.flush()
    os._exit(code)  # the worker may be mid-decode in native code: do not wait for it


def _check(factory: EngineFactory, model: str | None, settings: Settings) -> int:
    t0 = time.perf_counter()
    try:
        engine = factory(model, settings.runtime, settings.device)
    except Exception as e:
        print(f"codecomplete-lsp: could not load {model or 'the default model'}: {e}", file=sys.stderr)
        return 1
    describe = getattr(engine, "describe", None)
    info = describe() if callable(describe) else type(engine).__name__
    print(f"codecomplete-lsp: loaded {model or 'the default model'} in {(time.perf_counter() - t0) * 1000:.0f} ms: {info}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
