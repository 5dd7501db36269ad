"""The config a training run starts from: a fresh one (``dlm.config.build_config``), a
resumed one (the saved config; only ``RESUMABLE`` keys may change) or a fine-tuning one
(the source run's config with the asked settings on top)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from dlm.checkpoint import latest_checkpoint, read_run_config
from dlm.data import is_pairs_data, prepare_data
from dlm.config import finalize, from_dict, load_yaml, migrate, nest, parse_override, resolve_config_path
from dlm.errors import DlmError
from dlm.schema import RunConfig
from dlm.service.pretrained import is_pretrained, pretrained_config
from dlm.settings import apply_dict

# Keys a resumed run may change; everything else must stay as the run was started.
# train.batch_size and train.parallel may change so that a run can move to another number of
# processes: keep batch_size × processes constant to follow the same global batch.
# train.compile changes how the steps run, not what they compute (checkpoints are the same either way).
RESUMABLE = {"train.steps", "train.time_budget_s", "train.log_every", "train.ckpt_every", "train.keep_checkpoints",
             "train.device", "train.batch_size", "train.parallel", "train.compile"}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as flat dotted keys: ``{"train": {"lr": 1e-3}}`` → ``{"train.lr": 1e-3}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def asked_settings(config: str | None, overrides: list[str] | tuple = (), flags: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings asked for, as flat ``key: value``: the config file (or shipped name), then
    ``key=value`` overrides, then the ``flags`` that are not None."""
    asked: dict[str, Any] = {}
    if config:
        asked.update(flatten(migrate(load_yaml(resolve_config_path(config)))))
    for text in overrides:
        key, value = parse_override(text)
        asked[key] = value
    asked.update({k: v for k, v in (flags or {}).items() if v is not None})
    return asked


def resume_config(out: Path, config: str | None = None, overrides: list[str] | tuple = (),
                  flags: dict[str, Any] | None = None) -> RunConfig:
    """The config saved in run folder ``out``, with the settings asked for (``asked_settings``
    of ``config``, ``overrides`` and ``flags``) on top; any that would change a key outside
    ``RESUMABLE`` fails with one line."""
    saved = read_run_config(out)
    cfg = from_dict(copy.deepcopy(saved.to_dict()))
    before = flatten(saved.to_dict())
    for key, value in asked_settings(config, overrides, flags).items():
        apply_dict(cfg, migrate(nest(key, value)))
    finalize(cfg)
    after = flatten(cfg.to_dict())
    changed = [k for k in {**before, **after} if after.get(k) != before.get(k) and k not in RESUMABLE]
    if changed:
        k = changed[0]
        raise DlmError(
            f"--resume keeps the run's settings: {k} is {before.get(k)!r} in {out} but {after.get(k)!r} here "
            f"(only {', '.join(sorted(RESUMABLE))} may change)"
        )
    return cfg


def init_from_config(source: Path, config: str | None = None, overrides: list[str] | tuple = (),
                     flags: dict[str, Any] | None = None) -> RunConfig:
    """Fine-tuning: the config of run ``source`` (family, objective, model shape, tokenizer) with
    the settings asked for (``asked_settings`` of ``config``, ``overrides`` and ``flags``) on
    top; the trainer loads the source's weights, not its optimiser. ``flags["family"]`` and
    ``flags["data.tokenizer"]``, when given, must be the source's own."""
    if is_pretrained(str(source)):
        return pretrained_config(str(source), config, overrides, flags)
    source = Path(source)
    src = read_run_config(source)
    latest_checkpoint(source)  # a run with no checkpoint has no weights to start from
    flags = flags or {}
    family, tokenizer = flags.get("family"), flags.get("data.tokenizer")
    if family and family != src.family:
        raise DlmError(f"--init-from {source} is a '{src.family}' run, not '{family}': fine-tuning keeps "
                       f"the run's family and model (drop --family)")
    if tokenizer and tokenizer != src.data.tokenizer:
        raise DlmError(f"--init-from {source} was trained with the '{src.data.tokenizer}' tokenizer, not "
                       f"'{tokenizer}': fine-tuning keeps the run's tokenizer (drop --tokenizer)")
    cfg = from_dict(src.to_dict())
    cfg.distill = type(cfg.distill)()  # a student's own distillation does not carry over to what starts from it
    asked = asked_settings(config, overrides, flags)
    cfg.data.sft_length = type(cfg.data)().sft_length  # the new run's own choice (the source's may predate it)
    if asked.get("objective", cfg.objective.name) != cfg.objective.name:
        cfg.objective = type(cfg.objective)()  # another objective: the source's settings were its own
    for key, value in asked.items():
        apply_dict(cfg, migrate(nest(key, value)))
    cfg.train.init_from = str(source)
    return finalize(cfg)


def answer_width(run, prompt_len: int = 0) -> int:
    """The row an answer of ``run`` is generated in: a run fine-tuned with
    ``data.sft_length=batch`` on pairs saw rows no longer than its longest training row (prompt,
    response, one end-of-text), never the positions after it, so it answers in rows of that
    length (at least ``prompt_len`` + 1, at most seq_len); any other run in rows of seq_len, as
    does a run whose training data can no longer be read."""
    cfg = run.cfg
    try:
        if cfg.data.sft_length != "batch" or not is_pairs_data(cfg.data.data):
            return cfg.data.seq_len
        longest = int(prepare_data(cfg.data, run.tokenizer).lengths("train").max())
    except DlmError:  # the training data moved or is offline
        return cfg.data.seq_len
    return min(cfg.data.seq_len, max(longest, prompt_len + 1))
