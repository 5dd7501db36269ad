"""The run config's ``distill:`` section: what ``dlm distill`` records in a student's config.

A run whose ``distill.teacher`` is None is not a distillation, and its ``config.yaml`` has no
``distill:`` section (older run folders have none: they load with these defaults).
"""

from __future__ import annotations

from dataclasses import dataclass

from dlm.errors import DlmError
from dlm.settings import setting

DIVERGENCE_NAMES = ("kl-bwd", "kl-fwd", "mse", "tvd")


@dataclass
class DistillConfig:
    """Rounds of distillation that each halve the sampling steps (SDTT, arXiv 2410.21035; Duo's
    DCD, arXiv 2506.10892). Round r (from 0) has the teacher at ``start_steps / 2^r`` steps and
    trains the student for ``start_steps / 2^(r+1)``; the student of the last round samples at
    ``student_steps`` = ``start_steps / 2^rounds``."""

    teacher: str | None = None  # the teacher run folder (set by dlm distill); None: not a distillation
    rounds: int = setting(7, lo=1)  # SDTT: 7 rounds take 1,024 steps to 8
    steps_per_round: int = setting(200, lo=1)  # optimiser steps per round (SDTT and Duo: 10,000 on GPUs)
    start_steps: int = setting(1024, lo=2)  # the teacher's sampling steps in the first round
    # the divergence between the student's one step and the teacher's target: kl-bwd KL(student ‖ teacher)
    # (SDTT's and Duo's shipped choice), kl-fwd KL(teacher ‖ student), mse (of log-probabilities, mean
    # over the vocabulary), tvd (total variation, ½ Σ |p − q|)
    divergence: str = setting("kl-bwd", choices=DIVERGENCE_NAMES)
    # how the teacher makes its target: ancestral (SDTT: two ancestral steps of the teacher, mdlm) or
    # duality (DCD: the teacher at the earlier point of Duo's Gaussian trajectory, usdm); None: the family's
    teacher_sampler: str | None = setting(None, choices=(None, "ancestral", "duality"))

    @property
    def student_steps(self) -> int:
        return self.start_steps // 2**self.rounds

    def teacher_steps(self, round_: int) -> int:
        return self.start_steps // 2**round_

    def check_halving(self) -> None:
        """Every round halves a whole number of steps, down to at least one (raises DlmError)."""
        if self.start_steps % 2**self.rounds:
            raise DlmError(f"distill.start_steps {self.start_steps} does not halve {self.rounds} times "
                           f"(each round halves the steps: start_steps must be a multiple of 2^rounds = "
                           f"{2**self.rounds}, e.g. {2**self.rounds * max(1, round(self.start_steps / 2**self.rounds))})")
