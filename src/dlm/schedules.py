"""Noise schedules α(t): the probability that a token is still clean at time t ∈ [0, 1].

Every schedule here satisfies α(0) = 1 and α(1) = 0 *exactly*, so that corruption at t = 0
is the identity, the t = 1 marginal is exactly the prior, and the diffusion NELBO needs no
prior-mismatch or reconstruction term. Schedules that in the papers only approach those
ends (MDLM's ``linear`` and ``geometric`` total-noise schedules, which give
α(t) = exp(−σ(t))) are renormalised:

    α(t) = (ᾱ(t) − ᾱ(1)) / (ᾱ(0) − ᾱ(1)),

which keeps their shape and makes the ends exact. Each schedule gives α(t) and its
derivative α'(t) in closed form; ``weight(t) = −α'(t) / (1 − α(t))`` is the continuous-time
NELBO weight of masked diffusion (MDLM eq. 10).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from dlm.registry import Registry

SCHEDULES: Registry[type["Schedule"]] = Registry("schedule")


class Schedule(ABC):
    name: str

    @abstractmethod
    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """α(t), elementwise."""

    @abstractmethod
    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        """dα/dt, elementwise (≤ 0)."""

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """−α'(t) / (1 − α(t)): the MDLM NELBO weight of a masked token at time t."""
        return -self.alpha_prime(t) / (1.0 - self.alpha(t)).clamp_min(1e-12)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@SCHEDULES.register("loglinear")
class LogLinear(Schedule):
    """α(t) = 1 − t (MDLM/SEDD's log-linear total noise σ(t) = −log(1 − t)); weight 1/t."""

    name = "loglinear"

    def alpha(self, t):
        return 1.0 - t

    def alpha_prime(self, t):
        return -torch.ones_like(t)


@SCHEDULES.register("cosine")
class Cosine(Schedule):
    """α(t) = cos(π t / 2)."""

    name = "cosine"

    def alpha(self, t):
        # cos(π/2) is 6e-17 in floating point: pin the end to exactly 0.
        return torch.where(t >= 1.0, torch.zeros_like(t), torch.cos(0.5 * math.pi * t))

    def alpha_prime(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


class _Renormalised(Schedule):
    """α(t) = (exp(−σ(t)) − exp(−σ(1))) / (exp(−σ(0)) − exp(−σ(1)))."""

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma_prime(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _ends(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zero, one = torch.zeros_like(like), torch.ones_like(like)
        return torch.exp(-self.sigma(zero)), torch.exp(-self.sigma(one))

    def alpha(self, t):
        a0, a1 = self._ends(t)
        return ((torch.exp(-self.sigma(t)) - a1) / (a0 - a1)).clamp(0.0, 1.0)

    def alpha_prime(self, t):
        a0, a1 = self._ends(t)
        return -self.sigma_prime(t) * torch.exp(-self.sigma(t)) / (a0 - a1)


@SCHEDULES.register("linear")
class Linear(_Renormalised):
    """Total noise linear in t, σ(t) = σ_min + t (σ_max − σ_min) (MDLM's ``linear``), renormalised."""

    name = "linear"

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sigma(self, t):
        return self.sigma_min + t * (self.sigma_max - self.sigma_min)

    def sigma_prime(self, t):
        return torch.full_like(t, self.sigma_max - self.sigma_min)


@SCHEDULES.register("geometric")
class Geometric(_Renormalised):
    """Total noise geometric in t, σ(t) = σ_min^(1−t) σ_max^t (MDLM/SEDD's ``geometric``), renormalised."""

    name = "geometric"

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sigma(self, t):
        return self.sigma_min ** (1.0 - t) * self.sigma_max**t

    def sigma_prime(self, t):
        return self.sigma(t) * math.log(self.sigma_max / self.sigma_min)


def get_schedule(name: str) -> Schedule:
    return SCHEDULES.get(name)()
