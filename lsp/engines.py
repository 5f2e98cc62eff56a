"""Which engine the language server's worker holds: the team service (setting `server`),
the local engine in a child process (the default, setting `isolate`), or in this process.

All three have `.complete(request) -> Completion | None` and `.describe()`; the first two
also `.watch_status(callback)` (crashes, restarts, an unreachable service) and `.close()`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from codecomplete.isolation import IsolatedFactory, factory_spec
from codecomplete.remote import RemoteEngine, public_url

from .settings import Settings

logger = logging.getLogger("codecomplete.lsp")


def can_isolate(factory: Any) -> bool:
    """A child process can build this factory's engines: a module-level callable, on POSIX
    (the child gets its socket and cancel cell as inherited file descriptors)."""
    if sys.platform == "win32":
        return False
    try:
        factory_spec(factory)
    except TypeError:
        return False
    return True


def make_engine(factory: Any, settings: Settings, model: str | None, runtime: str, device: str) -> Any:
    """The engine for these settings; model, runtime and device are the local engine's."""
    if settings.server:
        return RemoteEngine(settings.server, settings.api_key)
    if settings.isolate and can_isolate(factory):
        return IsolatedFactory(factory)(model, runtime, device)
    if settings.isolate:
        logger.info("the engine runs in the server's process: %r cannot be started in a child", factory)
    return factory(model, runtime, device)


def engine_target(settings: Settings, model: str | None) -> str:
    """What a load message names: the team server, or the model with its runtime and device."""
    if settings.server:
        return f"the team server {public_url(settings.server)}"
    return f"{model or 'the default model'} ({settings.runtime}, {settings.device})"


def close_engine(engine: Any) -> None:
    """Stop an engine's child process or connection (an in-process engine has nothing to stop)."""
    close = getattr(engine, "close", None)
    if callable(close):
        try:
            close()
        except Exception:
            logger.exception("closing the old engine failed")
