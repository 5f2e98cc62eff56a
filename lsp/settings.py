"""Client settings: the `codecomplete` section shared with the VS Code extension.

    {"model": str (a path or a pulled model's name; "" = the server's default), "runtime": "onnx" | "torch",
     "device": "cpu" | "cuda", "candidates": 1..16, "maxTokens": int, "deadlineMs": int,
     "multiline": "auto" | "always" | "never", "enable": {languageId: bool, "*": default},
     "isolate": bool, "server": str (URL, "" = local), "apiKey": str}

"isolate" (default true) runs the local engine in a child process, so that a crash of the
native runtime restarts the engine instead of ending the server. "server" set to the team
service's URL sends the same requests there instead (model, runtime and device are then
the service's); "apiKey" is its bearer token (never logged).

"multiline": "auto" lets the engine decide from the syntax at the cursor (an empty block
start gets a block, mid-line gets the rest of the line); "never" always stops at the line
end; "always" lets every completion run past it.

They arrive in initializationOptions and workspace/didChangeConfiguration, either as
{"codecomplete": {...}} or with the keys at the top level. A bad value is reported and
the old value stays; the other keys still apply.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codecomplete.hub import HubError, find_pulled
from codecomplete.request import CompletionOptions
from codecomplete.runtime import DEVICES, RUNTIMES

SECTION = "codecomplete"
MULTILINE = {"auto": None, "always": True, "never": False}
MAX_CANDIDATES = 16
MAX_TOKENS_LIMIT = 4096
DEADLINE_MS_RANGE = (1, 600_000)  # the VS Code extension clamps to the same ranges


@dataclass(frozen=True)
class Settings:
    model: str = ""  # a model folder or file, or a pulled model's name; "" = the server's default
    runtime: str = "onnx"
    device: str = "cpu"
    candidates: int = 4
    max_tokens: int = 48
    deadline_ms: int = 1000
    multiline: str = "auto"
    enable: Mapping[str, bool] = field(default_factory=lambda: {"*": True})
    isolate: bool = True  # the engine in a child process (codecomplete.isolation)
    server: str = ""  # the team service's URL; "" = the local engine
    api_key: str = field(default="", repr=False)  # never in a log line

    def enabled_for(self, language_id: str) -> bool:
        return bool(self.enable.get(language_id, self.enable.get("*", True)))

    @property
    def engine_key(self) -> tuple[str, str, str]:
        """What the loaded engine depends on: changing any of these reloads it."""
        return (self.model, self.runtime, self.device, self.isolate, self.server, self.api_key)

    def completion_options(self) -> CompletionOptions:
        return CompletionOptions(n=self.candidates, max_new_tokens=self.max_tokens,
                                 deadline_ms=float(self.deadline_ms), multiline=MULTILINE[self.multiline])


def _int_in(value: Any, lo: int, hi: int) -> int:
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole:
        raise ValueError(f"expected a whole number, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"must be between {lo} and {hi}, got {int(value)}")
    return int(value)


def _one_of(value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _model(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a model path or a pulled model's name (string), got {value!r}")
    value = value.strip()
    if value and not Path(value).expanduser().exists():
        try:
            pulled = find_pulled(value)
        except HubError as e:  # a short name shared by several pulled models
            raise ValueError(str(e)) from e
        if pulled is None:
            raise ValueError(f"no such model folder or file, and no pulled model of that name: {value} "
                             "(codecomplete models list shows the pulled ones)")
    return value


def _server_url(value: Any) -> str:
    from urllib.parse import urlsplit

    if not isinstance(value, str):
        raise ValueError(f"expected a URL (string), got {type(value).__name__}")
    url = value.strip().rstrip("/")
    if url:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    return url


def _api_key(value: Any) -> str:
    if not isinstance(value, str) or any(c in value for c in "\r\n"):
        raise ValueError("expected a string on one line")
    return value.strip()


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _enable(value: Any) -> tuple[dict[str, bool], list[str]]:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected an object of languageId -> true/false, got {value!r}")
    good, errors = {}, []
    for key, flag in value.items():
        if isinstance(flag, bool) and isinstance(key, str):
            good[key] = flag
        else:
            errors.append(f"enable.{key}: expected true or false, got {flag!r}")
    good.setdefault("*", True)
    return good, errors


# settings key -> (dataclass field, parser)
_PARSERS = {
    "model": ("model", _model),
    "runtime": ("runtime", lambda v: _one_of(v, RUNTIMES)),
    "device": ("device", lambda v: _one_of(v, DEVICES)),
    "candidates": ("candidates", lambda v: _int_in(v, 1, MAX_CANDIDATES)),
    "maxTokens": ("max_tokens", lambda v: _int_in(v, 1, MAX_TOKENS_LIMIT)),
    "deadlineMs": ("deadline_ms", lambda v: _int_in(v, *DEADLINE_MS_RANGE)),
    "multiline": ("multiline", lambda v: _one_of(v, tuple(MULTILINE))),
    "isolate": ("isolate", _flag),
    "server": ("server", _server_url),
    "apiKey": ("api_key", _api_key),
}
SECRET_KEYS = {"apiKey"}  # their values never appear in a message


def section_of(raw: Any) -> Mapping[str, Any]:
    """The codecomplete keys of a settings payload, nested or at the top level."""
    if not isinstance(raw, Mapping):
        return {}
    if isinstance(raw.get("settings"), Mapping):  # {"settings": {"codecomplete": {...}}}
        raw = raw["settings"]
    nested = raw.get(SECTION)
    if isinstance(nested, Mapping):
        return nested
    return {k: v for k, v in raw.items() if k in _PARSERS or k == "enable"}


def apply_settings(current: Settings, raw: Any) -> tuple[Settings, list[str]]:
    """(new settings, error messages): each bad value keeps the current one."""
    values = section_of(raw)
    changes: dict[str, Any] = {}
    errors: list[str] = []
    for key, value in values.items():
        if value is None:  # an unset setting in the editor: keep what we have
            continue
        try:
            if key == "enable":
                changes["enable"], enable_errors = _enable(value)
                errors += enable_errors
            elif key in _PARSERS:
                name, parse = _PARSERS[key]
                changes[name] = parse(value)
        except ValueError as e:
            if key in SECRET_KEYS:
                errors.append(f"{SECTION}.{key}: {e}; keeping the current one")
            else:
                errors.append(f"{SECTION}.{key}: {e}; keeping {_current_value(current, key)!r}")
    return dataclasses.replace(current, **changes), errors


def _current_value(settings: Settings, key: str) -> Any:
    name = _PARSERS[key][0] if key in _PARSERS else key
    return getattr(settings, name)
