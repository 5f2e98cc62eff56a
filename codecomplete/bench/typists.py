"""Simulated typists for the serving benchmarks (bench serve over HTTP, bench serve
--device in process): each user opens its own place in a file and types through it at a
human pace, one completion request per keystroke; a late answer delays the next keystroke
(no superseding). Users typing together start once every one has its file open: a row
measures typing, not N files opened in the same instant (a cold prompt beside the typing is
bench serve's --cold-every-s row)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from codecomplete.request import CompletionOptions, CompletionRequest

PAUSE_CHANCE = 0.08  # per keystroke: the user stops to think


@dataclass
class Typing:
    """How the users type: keystrokes each, the median interval and pause length; max_s: a
    user starts no keystroke later than this after its first (a row's time cap)."""

    keystrokes: int
    interval_ms: float = 150.0
    pause_ms: float = 800.0
    max_s: float | None = None


def user_keystrokes(text: str, user: int, users: int, keystrokes: int) -> tuple[int, str, list[int]]:
    """(start, suffix, cursor offsets) of one user: users start at different lines of the
    file's second half, so no two share a prompt."""
    lines = [i + 1 for i, ch in enumerate(text) if ch == "\n" and i + 1 + keystrokes < len(text)]
    half = [p for p in lines if p >= len(text) // 2] or lines or [0]
    start = half[(user * max(1, len(half) // max(1, users))) % len(half)]
    end = min(len(text), start + keystrokes)
    return start, text[end:], list(range(start + 1, end + 1))


OPEN_WAIT_S = 600.0  # how long users typing together wait for the others' files to open


def type_through(send: Callable[[CompletionRequest], dict], text: str, path: str, language: str, user: int,
                 users: int, typing: Typing, options: CompletionOptions, rng: random.Random,
                 records: list[dict], opened: threading.Barrier | None = None) -> None:
    """One user: open the file (a request not counted), wait for the other users' (opened),
    then type at a human pace. send answers a request with the fields its record gets."""
    start, suffix, offsets = user_keystrokes(text, user, users, typing.keystrokes)
    user_path = f"user{user}/{path}"

    def request(offset: int) -> CompletionRequest:
        return CompletionRequest(text=text[:offset] + suffix, offset=offset, language=language, path=user_path,
                                 options=options)

    send(request(start))
    if opened is not None:
        try:
            opened.wait(OPEN_WAIT_S)
        except threading.BrokenBarrierError:  # a user whose open never came back: type anyway
            pass
    due = time.perf_counter()
    stop_at = due + typing.max_s if typing.max_s is not None else None
    for offset in offsets:
        due += rng.lognormvariate(0.0, 0.35) * typing.interval_ms / 1000.0
        if rng.random() < PAUSE_CHANCE:
            due += rng.lognormvariate(0.0, 0.5) * typing.pause_ms / 1000.0
        if stop_at is not None and due > stop_at and offset != offsets[0]:
            break
        time.sleep(max(0.0, due - time.perf_counter()))
        t0 = time.perf_counter()
        fields = send(request(offset))
        t1 = time.perf_counter()
        due = max(due, t1)  # a late answer delays the next keystroke
        records.append({"user": user, "offset": offset, "ms": (t1 - t0) * 1000.0, "t0": t0, "t1": t1, **fields})


def type_together(senders: list[Callable[[CompletionRequest], dict]], text: str, path: str, language: str,
                  typing: Typing, options: CompletionOptions, seed: int) -> tuple[list[dict], float]:
    """One thread per sender (user), all at once: their records and the wall time (s)."""
    records: list[dict] = []
    users = len(senders)
    opened = threading.Barrier(users)
    threads = [threading.Thread(target=type_through, daemon=True,
                                args=(send, text, path, language, u, users, typing, options,
                                      random.Random(seed * 1000 + u), records, opened))
               for u, send in enumerate(senders)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - t0


def keystrokes_per_s(records: list[dict]) -> float:
    """Answered keystrokes per second between the first keystroke's start and the last's
    end (the users' opening requests before it are not counted)."""
    if not records:
        return 0.0
    span = max(r["t1"] for r in records) - min(r["t0"] for r in records)
    return len(records) / span if span > 0 else 0.0
