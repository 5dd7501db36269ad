"""Run configuration: nested dataclasses, YAML files and dotted ``key=value`` overrides.

A run is fully described by one :class:`RunConfig`; it is written to ``RUN_DIR/config.yaml``
and read back by ``dlm eval``, ``dlm sample`` and ``--resume``. Unknown keys are errors,
never silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dlm.errors import DlmError

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class ModelConfig:
    """Backbone shape. ``size`` names a preset; any explicit field below overrides it."""

    size: str = "tiny"
    n_layer: int | None = None
    n_head: int | None = None
    d_model: int | None = None
    mlp_ratio: int = 4
    cond_dim: int = 128  # width of the adaLN time embedding (time-conditioned models only)
    dropout: float = 0.0


@dataclass
class DataConfig:
    data: str = "shakespeare"  # built-in name, local file or folder, or Hugging Face dataset
    tokenizer: str = "bpe"  # char | byte | bpe | gpt2
    vocab_size: int = 4096  # bpe only: size of the locally trained byte-level BPE
    seq_len: int = 128
    val_fraction: float = 0.05


@dataclass
class TrainConfig:
    steps: int = 500
    batch_size: int = 32
    grad_accum: int = 1  # micro-batches per optimiser step; batch_size is per micro-batch
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # 0 disables the EMA
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 0  # 0: checkpoint only at the end (and on Ctrl-C / SIGTERM)
    keep_checkpoints: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    time_budget_s: float = 0.0  # > 0: stop after this many seconds, LR schedule follows time


@dataclass
class EvalConfig:
    mc_samples: int = 4  # diffusion: Monte Carlo time samples per sequence for the NELBO
    max_tokens: int = 65536  # validation tokens evaluated (0: all)
    batch_size: int = 32


@dataclass
class SampleConfig:
    steps: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class SDDLMConfig:
    """The anti-uniform regulariser of SDDLM-V1/V2 (objectives ``sddlm-v1``, ``sddlm-v2``)."""

    reg_weight: float = 0.1  # λ: weight of mean log(p_θ(negative) + ε) in the loss
    reg_eps: float = 1e-4  # ε inside the log: bounds the term below by log ε
    negatives: int = 1  # V1: negatives drawn uniformly from the vocabulary per replaced token
    where: str = "changed"  # positions scored: changed (x_t ≠ x0, the paper's) | noised (resampled, x0 redrawn included)


@dataclass
class RunConfig:
    family: str = "mdlm"
    objective: str | None = None  # None: the family's default objective
    schedule: str = "loglinear"
    sampler: str | None = None  # None: the family's default sampler
    time_conditioning: bool | None = None  # None: the family's default
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    sddlm: SDDLMConfig = field(default_factory=SDDLMConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
        if dataclasses.is_dataclass(current):
            apply_dict(current, value, path + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], path))


def from_dict(data: dict[str, Any]) -> RunConfig:
    cfg = RunConfig()
    apply_dict(cfg, data or {})
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


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DlmError(f"cannot read config {path}: {e}") from None
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
    """Defaults ← YAML file ← ``key=value`` overrides ← explicit command-line flags."""
    cfg = RunConfig()
    if config:
        apply_dict(cfg, load_yaml(resolve_config_path(config)))
    for text in overrides:
        key, value = parse_override(text)
        apply_dict(cfg, nest(key, value))
    for key, value in flags.items():
        if value is not None:
            apply_dict(cfg, nest(key, value))
    return cfg


def save_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
