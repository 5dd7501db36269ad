"""Reading a run configuration: YAML files, dotted ``key=value`` overrides, the dlm-run/1
layout, and the one place where a config's components are resolved.

The sections themselves are plain dataclasses in :mod:`dlm.schema` (re-exported here);
the settings helpers are in :mod:`dlm.settings`. This module sits above the families:
:func:`finalize` checks every value and then has the family check its process', objective's
and sampler's settings and record every default, so ``config.yaml`` holds the full
settings. Unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dlm.errors import DlmError
from dlm.families import resolve_components
from dlm.schema import (POSITIVE, SEED_MAX, DataConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig)  # noqa: F401
from dlm.settings import ComponentConfig, Range, apply_dict, check_settings, setting  # noqa: F401

CONFIG_DIR = Path(__file__).parent / "configs"


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a config of the dlm-run/1 layout (still accepted in YAML files) into the current one.

    * ``objective: NAME`` and ``sampler: NAME`` (or null) become ``{name: NAME}``;
    * the root-level ``sddlm:`` section's keys move into ``objective`` (they were that
      objective's settings; they are dropped for objectives that have no such settings);
    * the ``sample:`` section's keys (steps, temperature, top_k, top_p) move into ``sampler``.
    """
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for key in ("process", "objective", "sampler"):
        if key in data and not isinstance(data[key], dict):
            data[key] = {"name": data[key]}
    if "sddlm" in data:
        old = data.pop("sddlm")
        if isinstance(old, dict):
            objective = dict(data.get("objective") or {})
            name = objective.get("name")
            # A dlm-run/1 config.yaml always has ``objective`` and recorded the ``sddlm``
            # defaults for every family: keep them only for the SDDLM objectives. A fragment
            # (``sddlm.reg_weight=0.2`` on the command line) has no objective: keep it.
            if "objective" not in data or name in ("sddlm-v1", "sddlm-v2"):
                objective = {**old, **objective}
            elif name == "sddlm" and "where" in old:
                objective = {"where": old["where"], **objective}
            data["objective"] = objective
    if "sample" in data:
        old = data.pop("sample")
        if isinstance(old, dict):
            data["sampler"] = {**old, **dict(data.get("sampler") or {})}
    return data


def from_dict(data: dict[str, Any]) -> RunConfig:
    """A checked RunConfig from a dict of the current or the dlm-run/1 layout."""
    cfg = RunConfig()
    apply_dict(cfg, migrate(data or {}))
    return finalize(cfg)


def finalize(cfg: RunConfig) -> RunConfig:
    """Check every setting and resolve the objective's and sampler's (the one place)."""
    check_settings(cfg)
    resolve_components(cfg)
    return cfg


def resolve_config_path(name: str) -> Path:
    """A path to a YAML file, or the name of a config shipped in ``dlm/configs``."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise DlmError(f"config '{name}' is neither a file nor a shipped config ({names})")


class _DuplicateKey(yaml.YAMLError):
    """A key given twice in one mapping: its dotted path and the lines of both."""

    def __init__(self, key: str, first: int, again: int):
        self.key, self.first, self.again = key, first, again


def _check_unique_keys(node: yaml.Node, prefix: str = "", seen_nodes: set[int] | None = None) -> None:
    """Raise _DuplicateKey for the first mapping key given twice in ``node``, as a dotted path."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias of a node already walked (or a recursive one)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[Any, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else id(key)
            if name in lines:
                raise _DuplicateKey(f"{prefix}{name}", lines[name], key.start_mark.line + 1)
            lines[name] = key.start_mark.line + 1
            _check_unique_keys(value, f"{prefix}{name}.", seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for value in node.value:
            _check_unique_keys(value, prefix, seen_nodes)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping: PyYAML keeps the
    last one silently, so an edited config would run with a value its author did not see."""

    def compose_document(self):
        node = super().compose_document()
        _check_unique_keys(node)
        return node


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except (OSError, UnicodeDecodeError) as e:
        raise DlmError(f"cannot read config {path}: {e}") from None
    except _DuplicateKey as e:
        raise DlmError(f"config {path} has a duplicate key '{e.key}' (lines {e.first} and {e.again}): "
                       "keep one of them") from None
    except yaml.YAMLError as e:
        raise DlmError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DlmError(f"config {path} must be a mapping of keys to values")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=3e-4`` → (``train.lr``, 0.0003); values are parsed as YAML scalars."""
    if "=" not in text:
        raise DlmError(f"override '{text}' must look like key=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def build_config(config: str | None, overrides: list[str], flags: dict[str, Any]) -> RunConfig:
    """Defaults ← YAML file ← ``key=value`` overrides ← explicit command-line flags, checked."""
    cfg = RunConfig()
    if config:
        apply_dict(cfg, migrate(load_yaml(resolve_config_path(config))))
    family = cfg.family
    apply_overrides(cfg, overrides, flags)
    if cfg.family != family:
        # a config's objective and process are its own family's: another family takes its defaults
        for section in ("objective", "process"):
            named = any(o.split("=", 1)[0].split(".")[0] == section for o in overrides) or flags.get(section)
            if not named:
                setattr(cfg, section, ComponentConfig())
    return finalize(cfg)


def apply_overrides(cfg: RunConfig, overrides: list[str], flags: dict[str, Any]) -> None:
    for text in overrides:
        key, value = parse_override(text)
        apply_dict(cfg, migrate(nest(key, value)))
    for key, value in flags.items():
        if value is not None:
            apply_dict(cfg, migrate(nest(key, value)))


def save_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
