"""Guards of the server process: stdin that survives bad bytes, stdout kept for LSP, the parent watch."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable

logger = logging.getLogger("codecomplete.lsp")

PARENT_POLL_S = float(os.environ.get("CODECOMPLETE_PARENT_POLL_S", "2"))  # seconds between checks


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


async def exit_when_gone(pid: int, exit_process: Callable[[int], object], poll_s: float = PARENT_POLL_S) -> None:
    """Poll the editor's process (initialize's processId); exit_process(0) once it is gone."""
    while True:
        await asyncio.sleep(poll_s)
        if not process_alive(pid):
            logger.warning("the editor (process %d) is gone: exiting", pid)
            sys.stderr.flush()
            exit_process(0)
            return
