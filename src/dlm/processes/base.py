"""Forward (corruption) processes q(x_t | x0) over token sequences."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from dlm.schedules import Schedule


def low_discrepancy(batch: int, generator: torch.Generator, device) -> torch.Tensor:
    """(u + i/B) mod 1 for i < B, one u ~ U[0, 1): each draw is uniform on [0, 1), and the batch
    covers the interval evenly (MDLM's antithetic time sampling), which lowers the variance
    of a batch estimate of a time integral without biasing it."""
    u = torch.rand((), generator=generator, device=device)
    return (u + torch.arange(batch, device=device) / batch) % 1.0


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
    def corrupt(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator,
                fixed: torch.Tensor | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x0) for x0: (B, L) and t: (B,); positions where ``fixed``
        (B, L) is true (clean context, padding) are left as they are in x0. The random draws
        do not depend on ``fixed``, so a generator state gives the same noise elsewhere."""

    @abstractmethod
    def prior(self, shape: tuple[int, ...], generator: torch.Generator, device) -> torch.Tensor:
        """Sample x_1 from the prior."""

