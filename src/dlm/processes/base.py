"""Forward (corruption) processes q(x_t | x0) over token sequences."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from dlm.schedules import Schedule


def antithetic_times(batch: int, generator: torch.Generator, device, t_min: float = 1e-3) -> torch.Tensor:
    """Low-discrepancy times (MDLM): t_i = t_min + (1 − t_min)·((u + i/B) mod 1), one u per batch.

    Every t_i is still marginally uniform on [t_min, 1], so the Monte Carlo estimate of a
    time integral stays unbiased for ∫_{t_min}^1 (times 1/(1 − t_min)) while its variance
    drops because the batch covers [t_min, 1] evenly.
    """
    u = torch.rand((), generator=generator, device=device)
    t = (u + torch.arange(batch, device=device) / batch) % 1.0
    return t_min + (1.0 - t_min) * t


class Process(ABC):
    """A forward process over a data vocabulary of ``vocab_size`` tokens."""

    def __init__(self, vocab_size: int, schedule: Schedule):
        self.vocab_size = vocab_size
        self.schedule = schedule

    @property
    def input_vocab_size(self) -> int:
        """Token ids the network must embed (data tokens plus any absorbing state)."""
        return self.vocab_size

    @abstractmethod
    def corrupt(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x0) for x0: (B, L) and t: (B,)."""

    @abstractmethod
    def prior(self, shape: tuple[int, ...], generator: torch.Generator, device) -> torch.Tensor:
        """Sample x_1 from the prior."""
