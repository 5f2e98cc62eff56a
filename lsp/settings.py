"""Client settings: the `codecomplete` section shared with the VS Code extension.

    {"model": str (a path or a pulled model's name; "" = the server's default), "runtime": "onnx" | "torch",
     "device": "cpu" | "cuda", "candidates": 1..16, "maxTokens": int, "deadlineMs": int,
     "multiline": "auto" | "always" | "never", "enable": {languageId: bool, "*": default}}

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

SECTION = "codecomplete"
RUNTIMES = ("onnx", "torch")
DEVICES = ("cpu", "cuda")
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

    def enabled_for(self, language_id: str) -> bool:
        return bool(self.enable.get(language_id, self.enable.get("*", True)))

    @property
    def engine_key(self) -> tuple[str, str, str]:
        """What the loaded engine depends on: changing any of these reloads it."""
        return (self.model, self.runtime, self.device)

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
}


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
            errors.append(f"{SECTION}.{key}: {e}; keeping {_current_value(current, key)!r}")
    return dataclasses.replace(current, **changes), errors


def _current_value(settings: Settings, key: str) -> Any:
    name = _PARSERS[key][0] if key in _PARSERS else key
    return getattr(settings, name)
