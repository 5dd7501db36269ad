"""What a comparison is: the models (name → run-config overrides), the seeds, the shared run
config and the measurements' settings, read from a compare config and checked in one place.

A compare config is YAML with two sections::

    compare:                      # this file's settings (CompareSettings below)
      seeds: 3
      models: {ar: {family: ar}, mdlm: {family: mdlm}, sddlm: {family: usdm, objective: sddlm}}
      sample_steps: [16, 64, 128]
    run:                          # the run config every model shares (any `dlm train` config)
      model: {size: tiny}
      data: {data: shakespeare, tokenizer: bpe}

Each model's run config is ``run`` ← command-line ``key=value`` overrides ← the model's own
overrides (so a model stays what its name says). A model that changes the family takes that
family's default objective and process unless it names them, as ``dlm train --family`` does.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from dlm.config import (RunConfig, apply_dict, check_settings, finalize, load_yaml, migrate, nest, parse_override,
                        resolve_config_path, setting)
from dlm.errors import DlmError


@dataclass
class CompareSettings:
    """The ``compare:`` section. Every list is checked for its items' range in :func:`load_spec`."""

    seeds: Any = 3  # a count N (seeds 0..N-1) or a list of seeds
    models: dict[str, Any] = field(default_factory=dict)  # name → run-config overrides
    sample_steps: list[int] = field(default_factory=lambda: [16, 64, 128])  # diffusion sampling steps measured
    samples: int = setting(16, lo=1)  # unconditional samples per step count for Gen PPL and entropy
    # Gen PPL judge: None = the default (smollm2-135m), a local HF folder, or "source": the synthetic
    # source the data comes from (dlm.data.sources), exact
    judge: str | None = None
    samplers: list[str] = field(default_factory=list)  # more samplers measured like the runs' own, where a family has them
    infill_lengths: list[int] = field(default_factory=lambda: [1, 4, 16])  # masked-token completion span lengths
    infill_rows: int = setting(64, lo=1)  # validation rows per span length
    infill_steps: int = setting(0, lo=0)  # diffusion sampling steps for a span (0: one per span token)
    speed_steps: list[int] = field(default_factory=lambda: [64])  # diffusion steps at which speed is timed
    speed_repeats: int = setting(2, lo=1)  # timed draws per throughput figure at least (after one warm-up; more while quick)
    speed_batches: list[int] = field(default_factory=lambda: [1, 4, 32])  # batch 1: latency; 4: batches/s; 32: tokens/s
    threads: int = setting(1, lo=0)  # torch threads for the whole comparison (0: torch's default); fixed for timing
    eval_seed: int = setting(0, lo=0)  # one noise seed for every model's bound: the same draws of t / masks
    unique_tokens: int = setting(0, lo=0)  # > 0: data-constrained mode, train on the first N tokens only
    epochs: float = setting(0.0, lo=0)  # with unique_tokens: epochs over them (train.steps follows)
    epoch_marks: list[float] = field(default_factory=list)  # epochs where validation bits are measured (empty: 1, 2, 4, …)
    plots: bool = True  # PNG plots beside report.md (matplotlib: pip install 'dlm[bench]'); false: report and JSON only


@dataclass
class ModelPlan:
    name: str
    overrides: dict[str, Any]
    cfg: RunConfig  # seed 0's; per seed only train.seed changes


@dataclass
class Spec:
    settings: CompareSettings
    seeds: list[int]
    models: list[ModelPlan]
    base: dict[str, Any]  # the ``run`` section as read
    source: str | None  # the config file
    overrides: list[str]
    mark_steps: dict[float, int] = field(default_factory=dict)  # data-constrained: epoch mark → step

    def run_config(self, model: ModelPlan, seed: int) -> RunConfig:
        cfg = copy.deepcopy(model.cfg)
        cfg.train.seed = seed
        return cfg


def parse_seeds(value: Any) -> list[int]:
    """``3`` → [0, 1, 2]; ``"0,4,7"`` or ``[0, 4, 7]`` → those seeds (distinct, ≥ 0)."""
    from dlm.config import SEED_MAX

    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if "," not in text else [int(s) for s in text.split(",") if s.strip()]
        except ValueError:
            raise DlmError(f"--seeds must be a count (3) or a comma-separated list of seeds (0,1,2), got {text!r}") from None
    if isinstance(value, bool):
        raise DlmError(f"seeds must be a count or a list of seeds, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise DlmError(f"the number of seeds must be ≥ 1, got {value}")
        return list(range(value))
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise DlmError(f"seeds must be a count or a non-empty list of integers, got {value!r}")
    if any(not 0 <= s <= SEED_MAX for s in value):
        raise DlmError(f"every seed must be in [0, {SEED_MAX}], got {value}")
    if len(set(value)) != len(value):
        raise DlmError(f"the seeds must be distinct, got {value}")
    return list(value)


def _int_list(name: str, value: Any, lo: int) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= lo
                                                           for v in value):
        raise DlmError(f"compare.{name} must be a non-empty list of integers ≥ {lo}, got {value!r}")
    return sorted(set(value))


def _read(config: str | None) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    if config is None:
        config = "compare"
    path = resolve_config_path(config)
    data = load_yaml(path)
    if not isinstance(data, dict) or set(data) - {"compare", "run"} or not isinstance(data.get("compare"), dict):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DlmError(f"{path} is not a compare config: it needs a 'compare:' mapping and optionally a 'run:' one "
                       f"(found {found}; a `dlm train` config goes under 'run:')")
    run = data.get("run") or {}
    if not isinstance(run, dict):
        raise DlmError(f"{path}: the 'run:' section must be a mapping of run-config keys")
    return data["compare"], run, str(path)


def _model_config(name: str, base: dict[str, Any], overrides: list[tuple[str, Any]],
                  own: dict[str, Any]) -> RunConfig:
    """``base`` ← ``overrides`` ← ``own``; sections of another family's making reset (see module doc)."""
    from dlm.families import FAMILIES

    cfg = RunConfig()
    apply_dict(cfg, migrate(copy.deepcopy(base)))
    family = cfg.family
    named = {key.split(".")[0] for key, _ in overrides} | {key.split(".")[0] for key in own}
    for key, value in [*overrides, *own.items()]:
        apply_dict(cfg, migrate(nest(key, copy.deepcopy(value))))
    if cfg.family != family:
        for section in ("objective", "process"):
            if section not in named and hasattr(cfg, section):
                setattr(cfg, section, type(getattr(cfg, section))())
        if "sampler" not in named:  # the shared sampler settings (steps, top_p…) the new family's sampler takes
            fam = FAMILIES.get(cfg.family)
            keep = {f.name for f in dataclasses.fields(fam.samplers.get(fam.default_sampler).Settings)}
            cfg.sampler.name = None
            cfg.sampler.settings = {k: v for k, v in cfg.sampler.settings.items() if k in keep}
    try:
        return finalize(cfg)
    except DlmError as e:
        raise DlmError(f"model '{name}': {e}") from None


def load_spec(config: str | None, overrides: list[str], models: str | None = None, seeds: str | None = None,
              unique_tokens: int | None = None, epochs: float | None = None) -> Spec:
    """The checked comparison: every model's run config resolved (an unknown key fails here)."""
    section, base, source = _read(config)
    settings = CompareSettings()
    section = dict(section)
    model_table = section.pop("models", None)
    seeds_value = section.pop("seeds", settings.seeds)
    run_overrides: list[tuple[str, Any]] = []
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("compare."):
            sub = key[len("compare."):]
            if sub == "models":
                raise DlmError("pick models with --models a,b (compare.models is the config's table)")
            if sub == "seeds":
                seeds_value = value
            else:
                section.update(nest(sub, value))
        else:
            run_overrides.append((key, value))
    list_fields = {"sample_steps", "speed_steps", "infill_lengths", "speed_batches", "epoch_marks", "samplers"}
    for key in list_fields:
        if key in section and isinstance(section[key], (int, float, str)) and not isinstance(section[key], bool):
            section[key] = [section[key]]  # compare.sample_steps=64 on the command line
    apply_dict(settings, {k: v for k, v in section.items() if k not in list_fields}, "compare.")
    for key in list_fields & set(section):
        setattr(settings, key, section[key])
    check_settings(settings, "compare.")
    settings.sample_steps = _int_list("sample_steps", settings.sample_steps, 1)
    settings.speed_steps = _int_list("speed_steps", settings.speed_steps, 1)
    settings.infill_lengths = _int_list("infill_lengths", settings.infill_lengths, 1)
    settings.speed_batches = _int_list("speed_batches", settings.speed_batches, 1)
    if unique_tokens is not None:
        settings.unique_tokens = unique_tokens
    if epochs is not None:
        settings.epochs = epochs
    if settings.unique_tokens < 0 or settings.epochs < 0 or not math.isfinite(settings.epochs):
        raise DlmError(f"--unique-tokens and --epochs must be ≥ 0, got {settings.unique_tokens} and {settings.epochs}")
    if bool(settings.unique_tokens) != bool(settings.epochs):
        raise DlmError("data-constrained mode needs both --unique-tokens N and --epochs E (> 0)")

    if not isinstance(model_table, dict) or not model_table:
        raise DlmError(f"{source}: compare.models must be a mapping of model name → run-config overrides")
    for name, own in model_table.items():
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise DlmError(f"{source}: model name {name!r} must be a plain name (it names run folders)")
        if not isinstance(own, dict):
            raise DlmError(f"{source}: compare.models.{name} must be a mapping of run-config keys, got {own!r}")
    chosen = list(model_table)
    if models is not None:
        chosen = [m.strip() for m in models.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in model_table]
        if unknown or not chosen:
            raise DlmError(f"unknown model {', '.join(repr(m) for m in unknown) or repr(models)} "
                           f"(this compare config has {', '.join(model_table)})")
        if len(set(chosen)) != len(chosen):
            raise DlmError(f"--models names a model twice: {models}")
    plans = [ModelPlan(name, dict(model_table[name]), _model_config(name, base, run_overrides, model_table[name]))
             for name in chosen]
    _check_samplers(settings.samplers, plans)
    _check_budgets(settings, plans)
    spec = Spec(settings, parse_seeds(seeds if seeds is not None else seeds_value), plans, base, source, overrides)
    if settings.unique_tokens:
        _data_constrained(spec)
    return spec


def _check_samplers(names: Any, plans: list[ModelPlan]) -> None:
    """``compare.samplers``: distinct names, each a sampler of some family (a model whose family
    lacks it is measured with its own only, so ``--models`` may pick a subset)."""
    from dlm.families import FAMILIES

    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise DlmError(f"compare.samplers must be a list of distinct sampler names, got {names!r}")
    offered = {n for family in FAMILIES.names() for n in FAMILIES.get(family).samplers.names()}
    for name in names:
        if name not in offered:
            raise DlmError(f"compare.samplers: no family has a sampler '{name}' (samplers: {', '.join(sorted(offered))})")


def _check_budgets(settings: CompareSettings, plans: list[ModelPlan]) -> None:
    """No sampling budget above a discrete-time process's T (``process.steps``): its sampler
    would refuse it after the training, not before."""
    budgets = [*settings.sample_steps, *settings.speed_steps, settings.infill_steps, *settings.infill_lengths]
    for p in plans:
        section = getattr(p.cfg, "process", None)
        T = section.settings.get("steps") if section is not None else None
        if isinstance(T, int) and max(budgets) > T:
            raise DlmError(f"model '{p.name}': its process has T = {T} steps (process.steps), fewer than this comparison's "
                           f"largest sampling budget {max(budgets)} (compare.sample_steps / speed_steps / infill): "
                           f"raise process.steps or lower the budgets")


def _data_constrained(spec: Spec) -> None:
    """Train on the first ``unique_tokens`` tokens for ``epochs`` epochs; checkpoint every epoch
    and keep them all, so validation bits can be measured at each epoch mark afterwards."""
    s = spec.settings
    marks = s.epoch_marks or _geometric_marks(s.epochs)
    if not isinstance(marks, list) or not all(isinstance(m, (int, float)) and not isinstance(m, bool) and 0 < m <= s.epochs
                                              for m in marks):
        raise DlmError(f"compare.epoch_marks must be a list of epochs in (0, {s.epochs:g}], got {marks!r}")
    for plan in spec.models:
        cfg = plan.cfg
        tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
        blocks = s.unique_tokens // cfg.data.seq_len
        if blocks < cfg.train.batch_size:
            raise DlmError(f"--unique-tokens {s.unique_tokens:,} is less than one batch of {cfg.train.batch_size} "
                           f"sequences of {cfg.data.seq_len} tokens")
        steps_per_epoch = blocks * cfg.data.seq_len / tokens_per_step
        cfg.data.max_train_tokens = s.unique_tokens
        cfg.train.steps = max(1, round(s.epochs * steps_per_epoch))
        spec.mark_steps = {float(m): max(1, round(m * steps_per_epoch)) for m in sorted(set(marks))}
        # a checkpoint at every mark: ckpt_every divides them all, and every one is kept (pruned after)
        every = math.gcd(*spec.mark_steps.values(), cfg.train.steps)
        cfg.train.ckpt_every = every
        cfg.train.keep_checkpoints = cfg.train.steps // every + 1
        finalize(cfg)


def _geometric_marks(epochs: float) -> list[float]:
    """1, 2, 4, … up to ``epochs``, and ``epochs`` itself (a fraction of one epoch: just that)."""
    marks, e = [], 1.0
    while e < epochs:
        marks.append(e)
        e *= 2
    return marks + [float(epochs)]
