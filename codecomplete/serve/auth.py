"""API keys of the team server: the keys file, constant-time checks, per-key concurrency.

A keys file has one key per line, or `name:key` per line (the name is what logs show);
blank lines and lines starting with `#` are skipped. A bare key is named `key<line>`.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

MIN_KEY_CHARS = 8


class KeysFileError(ValueError):
    """A keys file that cannot be used; the message names the line."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    secret: str

    def __repr__(self) -> str:  # never the secret in a log or a traceback
        return f"ApiKey(name={self.name!r})"


def parse_keys(text: str) -> list[ApiKey]:
    """The keys of a keys file's text; KeysFileError for a short key or a repeated name."""
    keys: list[ApiKey] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, secret = line.partition(":")
        if not sep:
            name, secret = f"key{number}", line
        name, secret = name.strip(), secret.strip()
        if not name:
            raise KeysFileError(f"line {number}: empty name before ':'")
        if len(secret) < MIN_KEY_CHARS or any(ch.isspace() for ch in secret):
            raise KeysFileError(f"line {number}: a key needs at least {MIN_KEY_CHARS} characters and no spaces")
        if any(k.name == name for k in keys):
            raise KeysFileError(f"line {number}: the name {name!r} is used twice")
        keys.append(ApiKey(name, secret))
    return keys


def load_keys(path: str | Path) -> list[ApiKey]:
    """The keys of a keys file; KeysFileError when it is missing, unreadable or has none."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KeysFileError(f"cannot read the keys file {path}: {e}") from e
    keys = parse_keys(text)
    if not keys:
        raise KeysFileError(f"the keys file {path} holds no key")
    return keys


class KeyRing:
    """Which key, if any, an `Authorization: Bearer ...` header carries."""

    def __init__(self, keys: list[ApiKey]):
        self._keys = [(k.name, k.secret.encode("utf-8")) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, authorization: str | None) -> str | None:
        """The key's name, or None. Every key is compared, in constant time each, so the
        time taken does not tell which key or how much of it matched."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        offered = token.strip().encode("utf-8")
        found = None
        for name, secret in self._keys:
            if hmac.compare_digest(offered, secret) and found is None:
                found = name
        return found


class ConcurrencyLimit:
    """At most `limit` requests in flight per key name (one ingress process: no locks needed,
    its event loop runs one handler at a time between awaits)."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("the per-key concurrency limit must be at least 1")
        self.limit = limit
        self._in_flight: dict[str, int] = {}

    def acquire(self, name: str) -> bool:
        count = self._in_flight.get(name, 0)
        if count >= self.limit:
            return False
        self._in_flight[name] = count + 1
        return True

    def release(self, name: str) -> None:
        count = self._in_flight.get(name, 0) - 1
        if count > 0:
            self._in_flight[name] = count
        else:
            self._in_flight.pop(name, None)

    def in_flight(self, name: str) -> int:
        return self._in_flight.get(name, 0)
