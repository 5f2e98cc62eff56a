"""The language server's handlers: each turns LSP params into a call and the answer back into LSP types.

Features: textDocument/inlineCompletion (each candidate an item with insertText + range),
textDocument/completion (menu items with text edits), incremental sync, UTF-8 / UTF-16
positions, settings from initializationOptions and workspace/didChangeConfiguration
(settings.py), `codecomplete/status` notifications, work-done progress while loading.
The command line (`codecomplete-lsp`) is main.py; the engine runs in worker.py's thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams
from pygls.lsp.server import LanguageServer

from codecomplete import __version__
from codecomplete.request import Completion, CompletionRequest, Neighbour
from codecomplete.text import document_problem

from . import items as lsp_items
from .capabilities import ClientSupport
from .documents import Document, Documents, PositionError
from .engines import engine_target, make_engine
from .jobs import LatestJobs
from .process import exit_when_gone
from .protocol import CodecompleteProtocol
from .settings import SECTION, Settings, apply_settings, section_of
from .worker import EngineFactory, Worker, default_engine_factory
from .workspace import prompt_path, root_uris

logger = logging.getLogger("codecomplete.lsp")

STATUS_METHOD = "codecomplete/status"
MAX_NEIGHBOURS = 8



# -- pure helpers -------------------------------------------------------------------------
def settings_after_failed_load(settings: Settings, loaded_key: tuple | None, default_model: str | None) -> Settings:
    """Settings that failed to load fall back to what is still loaded (loaded_key: the worker's engine_key)."""
    if loaded_key is None:
        return settings
    model_key, runtime, device = loaded_key
    return replace(settings, runtime=runtime, device=device,
                   model="" if model_key == default_model else (model_key or ""))


def status_params(state: str, message: str | None = None, latency_ms: float | None = None,
                  source: str | None = None) -> dict[str, Any]:
    """The params of a codecomplete/status notification."""
    params: dict[str, Any] = {"state": state}
    if message is not None:
        params["message"] = message
    if latency_ms is not None:
        params["latencyMs"] = round(latency_ms, 1)
    if source is not None:  # "cache" (typing-as-suggested), "warm" (prefix KV reused) or "cold"
        params["source"] = source
    return params


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
        self.client_support = ClientSupport()
        self.jobs = LatestJobs()
        self._shown_errors: set[str] = set()
        self._skipped: set[str] = set()  # uris we already logged as too big / binary
        self._tasks: set[asyncio.Task] = set()
        self.exit_process: Callable[[int], object] = os._exit

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
        self.protocol.notify(STATUS_METHOD, status_params(state, message, latency_ms, source))

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def watch_parent(self, pid: int) -> None:
        """Exit when the editor's process goes (it may die without closing our stdin)."""
        self.spawn(exit_when_gone(pid, self.exit_process))

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

    async def pull_settings(self) -> Any:
        """Our section as the client has it now (workspace/configuration); None if it would not say."""
        try:
            answer = await self.workspace_configuration_async(
                types.ConfigurationParams(items=[types.ConfigurationItem(section=SECTION)]))
        except Exception as e:
            logger.warning("workspace/configuration failed: %s", e)
            return None
        return answer[0] if answer else None

    async def load_engine(self) -> None:
        """(Re)load the engine in the worker, with progress and status notifications."""
        assert self.worker is not None
        s = self.settings
        model = s.model or self.default_model
        what = engine_target(s, model)
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
            self._watch_engine_status()
            return
        status = self.worker.status()
        self.settings = settings_after_failed_load(self.settings, status.engine_key, self.default_model)
        self.show_error_once(f"codecomplete: could not load {what}: {result.message}")
        self.notify_status("ready" if status.ready else "error", result.message)

    async def _begin_progress(self, message: str) -> str | None:
        if not self.client_support.progress:
            return None
        token = f"codecomplete-load-{uuid.uuid4()}"
        try:
            await asyncio.wait_for(self.work_done_progress.create_async(token), timeout=5.0)
        except Exception as e:  # the client refused or never answered: no progress then
            logger.debug("no work-done progress: %s", e)
            return None
        self.work_done_progress.begin(token, types.WorkDoneProgressBegin(title="codecomplete", message=message))
        return token

    def _watch_engine_status(self) -> None:
        """Crashes and restarts of a child-process engine, an unreachable team server: to the
        status bar (and an error once as a message), from whatever thread they happen on."""
        watch = getattr(self.worker.engine if self.worker else None, "watch_status", None)
        if not callable(watch):
            return
        loop = self.loop

        def from_any_thread(state: str, message: str) -> None:
            def show() -> None:
                self.notify_status(state, message)
                if state == "error":
                    self.show_error_once(f"codecomplete: {message}")

            try:
                loop.call_soon_threadsafe(show)
            except RuntimeError:  # the loop is closed: the server is going away
                pass

        watch(from_any_thread)

    def _make_engine(self, model: str | None, runtime: str, device: str) -> Any:
        return make_engine(self.engine_factory, self.settings, model, runtime, device)

    def start_worker(self) -> None:
        if self.worker is None:
            self.loop = asyncio.get_running_loop()
            self.worker = Worker(self._make_engine, self.loop)
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
        problem = document_problem(doc.text, offset)  # the engine would answer empty: skip the queue
        if problem is not None:
            self._log_skip(uri, f"no completions for {uri}: {problem}")
            return None
        # the whole document: the engine windows it; the deadline runs from the request's arrival
        request = CompletionRequest(text=doc.text, offset=offset, language=doc.language_id,
                                    path=prompt_path(uri, self.workspace_roots()), neighbours=self._neighbours(uri),
                                    options=self.settings.completion_options(),
                                    deadline=time.monotonic() + self.settings.deadline_ms / 1000.0)
        return Prepared(doc.snapshot(), offset, request)

    def _log_skip(self, uri: str, message: str) -> None:
        if uri not in self._skipped:
            self._skipped.add(uri)
            logger.info("%s", message)

    def workspace_roots(self) -> list[str]:
        """The URIs of the open workspace folders (and the root the client named)."""
        try:
            return root_uris(self.workspace)
        except RuntimeError:  # before initialize
            return []

    def _neighbours(self, uri: str) -> list[Neighbour]:
        out = []
        roots = self.workspace_roots()
        for other in self.documents.recent(exclude=uri, limit=MAX_NEIGHBOURS):
            if other.text:  # the engine cuts and cleans each one
                out.append(Neighbour(prompt_path(other.uri, roots), other.text, other.language_id))
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
        self.jobs.supersede(uri)
        job = self.worker.complete(prepared.request)
        self.jobs.track(uri, job)
        try:
            completion = await asyncio.wait_for(asyncio.shield(job.future),
                                                timeout=max(0.0, prepared.request.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            logger.info("deadline (%d ms) passed for %s: empty answer", self.settings.deadline_ms, uri)
            completion = None
            job.supersede()
        except asyncio.CancelledError:  # $/cancelRequest or shutdown: stop decoding too
            job.supersede()
            raise
        finally:
            self.jobs.release(uri, job)
        if completion is not None and not completion.cancelled:
            self.notify_status("ready", latency_ms=(time.perf_counter() - t0) * 1000.0, source=completion.source)
        return prepared, completion

    def forget(self, uri: str) -> None:
        """A document closed: stop its running job; a reopened one is logged afresh if skipped."""
        self._skipped.discard(uri)
        self.jobs.supersede(uri)


# -- handlers -----------------------------------------------------------------------------------
# (method, registration options, handler): create_server registers each on a new server.
HANDLERS: list[tuple[str, Any, Callable]] = []


def handler(method: str, options: Any = None) -> Callable[[Callable], Callable]:
    """Declare fn the handler of an LSP method on every server create_server makes."""
    def register(fn: Callable) -> Callable:
        HANDLERS.append((method, options, fn))
        return fn

    return register


@handler(types.INITIALIZE)
def on_initialize(ls: CodecompleteServer, params: types.InitializeParams) -> None:
    ls.client_support = ClientSupport.from_capabilities(params.capabilities)
    if params.initialization_options is not None:
        ls.update_settings(params.initialization_options, "initializationOptions")
    if params.process_id:
        ls.watch_parent(params.process_id)


@handler(types.INITIALIZED)
def on_initialized(ls: CodecompleteServer, params: types.InitializedParams) -> None:
    ls.start_worker()


@handler(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
async def on_did_change_configuration(ls: CodecompleteServer, params: types.DidChangeConfigurationParams) -> None:
    raw = params.settings
    if not section_of(raw) and ls.client_support.configuration:  # a "pull" client: ask for the section
        raw = await ls.pull_settings()
    ls.update_settings(raw, "workspace/didChangeConfiguration")


@handler(types.TEXT_DOCUMENT_DID_OPEN)
def on_did_open(ls: CodecompleteServer, params: types.DidOpenTextDocumentParams) -> None:
    ls.documents.open(params.text_document)


@handler(types.TEXT_DOCUMENT_DID_CHANGE)
def on_did_change(ls: CodecompleteServer, params: types.DidChangeTextDocumentParams) -> None:
    if ls.documents.change(params, ls.encoding) is None:
        logger.info("didChange for %s, which is not open: ignored", params.text_document.uri)


@handler(types.TEXT_DOCUMENT_DID_CLOSE)
def on_did_close(ls: CodecompleteServer, params: types.DidCloseTextDocumentParams) -> None:
    ls.documents.close(params.text_document.uri)
    ls.forget(params.text_document.uri)


@handler(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
async def on_inline_completion(ls: CodecompleteServer, params: types.InlineCompletionParams) -> types.InlineCompletionList:
    prepared, completion = await ls.run_completion(params.text_document.uri, params.position)
    if prepared is None or completion is None:
        return types.InlineCompletionList(items=[])
    return types.InlineCompletionList(
        items=lsp_items.inline_items(prepared.doc, prepared.offset, completion.candidates, ls.encoding))


@handler(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(trigger_characters=[".", "("], resolve_provider=False))
async def on_completion(ls: CodecompleteServer, params: types.CompletionParams) -> types.CompletionList:
    prepared, completion = await ls.run_completion(params.text_document.uri, params.position)
    if prepared is None or completion is None:
        return types.CompletionList(is_incomplete=True, items=[])
    items = lsp_items.completion_items(prepared.doc, prepared.offset, completion.candidates, ls.encoding,
                                       markdown=ls.client_support.markdown)
    # Incomplete: the candidates depend on every character typed, so ask again as the user types.
    return types.CompletionList(is_incomplete=True, items=items)


def create_server(engine_factory: EngineFactory = default_engine_factory, defaults: Settings | None = None,
                  default_model: str | None = None) -> CodecompleteServer:
    """A server with every handler registered (the engine factory is injectable for tests)."""
    ls = CodecompleteServer(engine_factory, defaults, default_model)
    for method, options, fn in HANDLERS:
        ls.feature(method, options)(fn)
    return ls
