"""Log records to the client as window/logMessage: stdout is the LSP channel, so logs go there."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from lsprotocol import types

if TYPE_CHECKING:
    from .server import CodecompleteServer


class ClientLogHandler(logging.Handler):
    """Forwards log records to the client as window/logMessage (from any thread)."""

    LEVELS = ((logging.ERROR, types.MessageType.Error), (logging.WARNING, types.MessageType.Warning),
              (logging.INFO, types.MessageType.Info))

    def __init__(self, server: CodecompleteServer, level: int = logging.INFO):
        super().__init__(level)
        self.server = server

    def emit(self, record: logging.LogRecord) -> None:
        loop = self.server.loop  # None until the worker starts
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
