"""``dlm distill``: a few-step student of a masked (SDTT) or uniform-state (DCD) diffusion run.

The student's config is the teacher's (family, model, tokenizer, data unless asked otherwise)
with the ``distill:`` section, ``train.init_from`` = the teacher, ``train.steps`` = rounds ×
steps per round and ``sampler.steps`` = the student's step count, so every command reads the
student as an ordinary run and ``dlm sample STUDENT`` samples at the steps it was distilled
for. Every check is made before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dlm.checkpoint import read_run_config
from dlm.config import finalize
from dlm.distill.methods import DISTILLERS
from dlm.errors import DlmError
from dlm.schema import RunConfig
from dlm.service.training import asked_settings, init_from_config, resume_config


def distill_config(teacher: Path, config: str | None = None, overrides: list[str] | tuple = (),
                   flags: dict[str, Any] | None = None) -> RunConfig:
    """The checked config of a student of run ``teacher`` with the settings asked for on top."""
    teacher = Path(teacher)
    family = read_run_config(teacher).family
    if family not in DISTILLERS:
        raise DlmError(f"{teacher} is a '{family}' run: dlm distill distils {' and '.join(DISTILLERS.names())} runs "
                       f"(mdlm by SDTT, usdm by Duo's DCD)")
    method = DISTILLERS.get(family)
    asked = asked_settings(config, overrides, flags)
    cfg = init_from_config(teacher, config, overrides, flags)
    d = cfg.distill
    d.check_halving()
    if d.teacher_sampler not in (None, method.teacher_sampler):
        raise DlmError(f"distill.teacher_sampler '{d.teacher_sampler}' is not for a '{family}' teacher: "
                       f"{method.__name__} takes its target by '{method.teacher_sampler}'")
    d.teacher, d.teacher_sampler = str(teacher), method.teacher_sampler
    cfg.train.steps = d.rounds * d.steps_per_round
    if "train.ema_decay" not in asked:
        cfg.train.ema_decay = 0.0  # an EMA would average the students of several rounds (step counts)
    cfg.sampler.settings["steps"] = d.student_steps
    return finalize(cfg)


def distill_resume_config(teacher: Path, out: Path, config: str | None = None, overrides: list[str] | tuple = (),
                          flags: dict[str, Any] | None = None) -> RunConfig:
    """The saved config of student ``out``, which must be a distillation of ``teacher``."""
    cfg = resume_config(Path(out), config, overrides, flags)
    if cfg.distill.teacher is None:
        raise DlmError(f"{out} is not a distillation: continue it with `dlm train --out {out} --resume`")
    if Path(cfg.distill.teacher).resolve() != Path(teacher).resolve():
        raise DlmError(f"{out} is a student of {cfg.distill.teacher}, not of {teacher}")
    return cfg


def distill(teacher: Path, out: Path, config: str | None = None, overrides: list[str] | tuple = (),
            flags: dict[str, Any] | None = None, resume: bool = False, progress: bool = True):
    """Distil ``teacher`` into student run ``out`` (or continue it with ``resume``); returns
    (the loop's TrainResult, the student's config)."""
    from dlm.train import train

    if resume:
        cfg = distill_resume_config(teacher, out, config, overrides, flags)
    else:
        cfg = distill_config(teacher, config, overrides, flags)
    return train(cfg, Path(out), resume=resume, progress=progress), cfg
