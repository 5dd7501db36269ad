"""Settings helpers: the one leaf module every component and the run config build on.

A component (process, objective, sampler, backbone) declares its settings as a dataclass
whose fields carry their allowed range or choices (:func:`setting`); :func:`apply_dict`
fills one from a mapping (YAML, ``key=value``), converting and refusing unknown keys, and
:func:`check_settings` checks every value, each with one line that names the key, the value
and what is allowed. :class:`ComponentConfig` is a component chosen by name with its
settings (``objective: {name: sddlm-v1, reg_weight: 0.1}``). Imports nothing of dlm but its
error type.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from dlm.errors import DlmError


class Range:
    """An allowed interval for a numeric config value, e.g. ``Range(0, 1, hi_open=True)`` is [0, 1)."""

    def __init__(self, lo=None, hi=None, lo_open=False, hi_open=False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open

    def ok(self, v) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '≥'} {self.lo}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '≤'} {self.hi}"
        return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"


def setting(default, lo=None, hi=None, lo_open=False, hi_open=False, choices=None, **kw):
    """A dataclass field with its allowed range (or choices), checked by :func:`check_settings`."""
    meta = {}
    if lo is not None or hi is not None:
        meta["range"] = Range(lo, hi, lo_open, hi_open)
    if choices is not None:
        meta["choices"] = tuple(choices)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class NoSettings:
    """A component without settings of its own."""


@dataclass
class ComponentConfig:
    """A component chosen by ``name`` (None: the family's default) with its own settings.

    In YAML ``objective: {name: sddlm-v1, reg_weight: 0.1}`` (or just ``objective: sddlm``);
    on the command line ``objective.reg_weight=0.1``. The component's ``Settings`` dataclass
    says which keys exist and their ranges; :func:`dlm.families.resolve_components` checks them
    and fills in every default, so ``config.yaml`` records the full settings.
    """

    name: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to a field's annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except DlmError:
                continue
        raise DlmError(f"config key '{key}' got {value!r}, expected {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise DlmError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise DlmError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise DlmError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise DlmError(f"config key '{key}' must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp} for {key}")


def apply_dict(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise DlmError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = _field_types(type(obj))
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in hints:
            valid = ", ".join(f"{prefix}{k}" for k in hints)
            raise DlmError(f"unknown config key '{path}' (valid keys: {valid})")
        current = getattr(obj, key)
        if isinstance(current, ComponentConfig):
            _apply_component(current, value, path)
        elif dataclasses.is_dataclass(current):
            apply_dict(current, value, path + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], path))


def _apply_component(comp: ComponentConfig, value: Any, path: str) -> None:
    """``objective: NAME`` / ``objective: {name: …, key: …}`` / ``objective.key=…``."""
    if value is None or isinstance(value, str):
        comp.name = value
        return
    if not isinstance(value, dict):
        raise DlmError(f"config key '{path}' must be a name or a mapping of settings, got {value!r}")
    for key, v in value.items():
        if key == "name":
            if v is not None and not isinstance(v, str):
                raise DlmError(f"config key '{path}.name' must be a string, got {v!r}")
            comp.name = v
        else:
            comp.settings[str(key)] = v


def check_settings(obj: Any, prefix: str = "") -> None:
    """Every numeric setting of a (nested) dataclass is finite and inside its ``Range``;
    settings with ``choices`` hold one of them. The message names the key, the value and
    what is allowed."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if isinstance(value, ComponentConfig):
            continue
        if dataclasses.is_dataclass(value):
            check_settings(value, key + ".")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise DlmError(f"config key '{key}' must be a finite number, got {value}")
        rule = f.metadata.get("range")
        if rule is not None and value is not None and not rule.ok(value):
            raise DlmError(f"config key '{key}' must be {rule}, got {value!r}")
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise DlmError(f"config key '{key}' must be one of {', '.join(map(str, choices))}, got {value!r}")
