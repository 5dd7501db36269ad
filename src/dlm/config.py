"""Run configuration: nested dataclasses, YAML files and dotted ``key=value`` overrides.

A run is fully described by one :class:`RunConfig`; it is written to ``RUN_DIR/config.yaml``
and read back by ``dlm eval``, ``dlm sample`` and ``--resume``. Unknown keys are errors,
never silently ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dlm.errors import DlmError

CONFIG_DIR = Path(__file__).parent / "configs"


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


POSITIVE = {"lo": 0, "lo_open": True}
SEED_MAX = 2**63 - 1


@dataclass
class ModelConfig:
    """Backbone shape. ``size`` names a preset; any explicit field below overrides it."""

    size: str = "tiny"
    n_layer: int | None = setting(None, lo=1)
    n_head: int | None = setting(None, lo=1)
    d_model: int | None = setting(None, lo=2)
    mlp_ratio: int = setting(4, lo=1)
    cond_dim: int = setting(128, lo=1)  # width of the adaLN time embedding (time-conditioned models only)
    dropout: float = setting(0.0, lo=0, hi=1, hi_open=True)
    activation_checkpointing: bool = False  # recompute each block in the backward: less memory, ~1/3 more compute


@dataclass
class DataConfig:
    data: str = "shakespeare"  # built-in name, local file or folder, or Hugging Face dataset
    tokenizer: str = "bpe"  # char | byte | bpe | gpt2
    vocab_size: int = setting(4096, lo=2)  # bpe only: size of the locally trained byte-level BPE
    seq_len: int = setting(128, lo=2, hi=65536)
    val_fraction: float = setting(0.05, lo=0, hi=0.5, lo_open=True)
    # > 0: train on only the first N tokens of the training split (data-constrained runs, epochs over them)
    max_train_tokens: int = setting(0, lo=0)


@dataclass
class TrainConfig:
    steps: int = setting(500, lo=1)
    batch_size: int = setting(32, lo=1)
    grad_accum: int = setting(1, lo=1)  # micro-batches per optimiser step; batch_size is per micro-batch
    lr: float = setting(1e-3, **POSITIVE)
    min_lr_ratio: float = setting(0.1, lo=0, hi=1)  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = setting(50, lo=0)
    weight_decay: float = setting(0.0, lo=0)
    beta1: float = setting(0.9, lo=0, hi=1, hi_open=True)
    beta2: float = setting(0.98, lo=0, hi=1, hi_open=True)
    grad_clip: float = setting(1.0, lo=0)  # 0: no clipping
    ema_decay: float = setting(0.999, lo=0, hi=1, hi_open=True)  # 0 disables the EMA
    seed: int = setting(0, lo=0, hi=SEED_MAX)
    log_every: int = setting(10, lo=1)
    ckpt_every: int = setting(0, lo=0)  # 0: checkpoint only at the end (and on Ctrl-C / SIGTERM)
    keep_checkpoints: int = setting(2, lo=1)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # under torchrun: ddp (whole model on every rank) or fsdp (FSDP2: weights, grads, optimiser and EMA sharded)
    parallel: str = setting("ddp", choices=("ddp", "fsdp"))
    time_budget_s: float = setting(0.0, lo=0)  # > 0: stop after this many seconds, LR schedule follows time
    # diffusion SFT: each row's clean tokens hidden with this probability (the unconditional
    # pass of classifier-free guidance, sampler.guidance, learns from these rows); 0: off
    prompt_dropout: float = setting(0.0, lo=0, hi=1)
    peak_tflops: float = setting(0.0, lo=0)  # the device's bf16 peak for MFU (0: look it up; CPUs: no MFU)
    # > 0: the output layer and the loss run this many sequences at a time under activation
    # checkpointing, so a large vocabulary's (B, L, V) float32 logits never exist at once
    loss_chunk_rows: int = setting(0, lo=0)
    # torch.compile each transformer block (inductor); the first step's wall time, compilation
    # included, is reported apart as compile_s and kept out of tokens/s
    compile: bool = False
    init_from: str | None = None  # fine-tune: start from this run's weights (fresh optimiser); set by --init-from


@dataclass
class EvalConfig:
    mc_samples: int = setting(4, lo=1)  # diffusion: Monte Carlo samples per sequence for the bound
    max_tokens: int = setting(65536, lo=0)  # validation tokens evaluated (0: all)
    batch_size: int = setting(32, lo=1)
    # discrete-time families (d3pm): evaluate every k-th of the T step terms — the exact NELBO
    # of the model that takes T/k steps (what ``sampler.steps`` = T/k samples from), not an
    # estimate of the T-step one; 1: every term
    time_stride: int = setting(1, lo=1)
    # continuous-time bounds: the share of the Monte Carlo times drawn log-uniformly on [1e-5, 1]
    # instead of uniformly, each draw weighted by 1/q(t) so the estimate keeps its expectation
    # (importance sampling of small t); None: the family's default (usdm 0.25, mdlm 0)
    log_t_share: float | None = setting(None, lo=0, hi=1, hi_open=True)


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


@dataclass
class RunConfig:
    family: str = "mdlm"
    schedule: str = "loglinear"
    time_conditioning: bool | None = None  # None: the family's default
    # the forward process, for families that offer more than one (d3pm: absorbing | uniform);
    # empty for the others, whose process is fixed
    process: ComponentConfig = field(default_factory=ComponentConfig)
    objective: ComponentConfig = field(default_factory=ComponentConfig)
    sampler: ComponentConfig = field(default_factory=ComponentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        out = _to_dict(self)
        if self.process.name is None and not self.process.settings:
            del out["process"]  # families with a fixed process: config.yaml as before
        return out


def _to_dict(obj: Any) -> Any:
    if isinstance(obj, ComponentConfig):
        return {"name": obj.name, **obj.settings}
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return copy.deepcopy(obj)


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


def from_dict(data: dict[str, Any]) -> RunConfig:
    """A checked RunConfig from a dict of the current or the dlm-run/1 layout."""
    cfg = RunConfig()
    apply_dict(cfg, migrate(data or {}))
    return finalize(cfg)


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


def finalize(cfg: RunConfig) -> RunConfig:
    """Check every setting and resolve the objective's and sampler's (the one place)."""
    check_settings(cfg)
    from dlm.families import resolve_components  # the families know their components

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
