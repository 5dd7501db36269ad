"""Distillation on the ordinary training loop: :class:`DistillTrainer` is the
:class:`~dlm.trainer.Trainer` whose family scores the student with the distillation method's
objective (:mod:`dlm.distill.methods`), which calls a frozen teacher too.

Round r covers optimiser steps [r·K, (r + 1)·K) (K = ``distill.steps_per_round``). Round 0's
teacher is the teacher run's weights (its EMA, what it samples with; the student starts from
them too, through ``train.init_from``); at the first step of each later round the student's
weights become the teacher (SDTT and Duo both hand the raw student over). Checkpoints carry
the round and, after round 0, the teacher's weights in ``trainer.pt``, so ``--resume``
continues mid-round with the same teacher and ends with the weights of an unbroken run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dlm.checkpoint import has_checkpoint, read_run_config
from dlm.distill.methods import DISTILLERS
from dlm.errors import DlmError
from dlm.trainer import Trainer
from dlm.trainer.checkpointer import Checkpointer
from dlm.trainer.setup import load_init_weights
from dlm.trainer.state import TrainState


class DistillCheckpointer(Checkpointer):
    """The loop's checkpointer, with the round and (after round 0) the teacher in ``trainer.pt``."""

    def __init__(self, base: Checkpointer, trainer: DistillTrainer):
        self.__dict__.update(base.__dict__)
        self.distill_trainer = trainer

    def trainer_state(self, state: TrainState) -> dict[str, Any]:
        out = super().trainer_state(state)
        method = self.distill_trainer.method
        out["distill_round"] = method.round
        out["distill_teacher"] = (None if method.round == 0 else
                                  {k: v.detach().cpu().clone() for k, v in method.teacher.state_dict().items()})
        return out


def check_teacher(teacher: Path, family: str) -> None:
    """The teacher is a trained run of the student's family (before any data is read)."""
    try:
        src = read_run_config(teacher)
    except DlmError as e:
        raise DlmError(f"distill.teacher: {e}") from None
    if src.family != family:
        raise DlmError(f"distill.teacher {teacher} is a '{src.family}' run; this student is '{family}'")
    if not has_checkpoint(teacher):
        raise DlmError(f"distill.teacher {teacher} has no checkpoint to distil from")


def whole(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The student's weights whole on every rank: under FSDP2 each parameter is a DTensor
    sharded over the ranks, gathered here (collective: every rank calls it, at the same step);
    the teacher is an ordinary module on each rank."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}


class DistillTrainer(Trainer):
    def __init__(self, cfg, *args, **kwargs):
        check_teacher(Path(cfg.distill.teacher), cfg.family)
        super().__init__(cfg, *args, **kwargs)
        self.checkpointer = DistillCheckpointer(self.checkpointer, self)

    def _build_model(self, init_from: Path | None, *source) -> None:
        super()._build_model(init_from, *source)
        d = self.cfg.distill
        teacher = self.family.build_model()
        load_init_weights(teacher, Path(d.teacher))
        teacher.to(self.device).eval().requires_grad_(False)
        self.method = DISTILLERS.get(self.cfg.family)(d, teacher)
        self.family.objective = self.method  # the family's training step now scores the distillation

    def _resume(self, ckpt, shards) -> None:
        super()._resume(ckpt, shards)
        st = ckpt.trainer
        self.method.round = int(st.get("distill_round", 0))
        if st.get("distill_teacher") is not None:
            self.method.teacher.load_state_dict(st["distill_teacher"])

    def train_step(self) -> None:
        d = self.cfg.distill
        round_ = min(self.state.step // d.steps_per_round, d.rounds - 1)
        if round_ != self.method.round:  # a new round: the student teaches it
            with torch.no_grad():
                self.method.teacher.load_state_dict(whole(self.model.state_dict()))
            self.method.round = round_
        super().train_step()
