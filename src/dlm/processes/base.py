"""Forward (corruption) processes q(x_t | x0) over token sequences."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn as nn

from dlm.schedules import Schedule
from dlm.settings import NoSettings


def low_discrepancy(batch: int, generator: torch.Generator, device) -> torch.Tensor:
    """(u + i/B) mod 1 for i < B, one u ~ U[0, 1): each draw is uniform on [0, 1), and the batch
    covers the interval evenly (MDLM's antithetic time sampling), which lowers the variance
    of a batch estimate of a time integral without biasing it."""
    u = torch.rand((), generator=generator, device=device)
    return (u + torch.arange(batch, device=device) / batch) % 1.0


def log_uniform_mix(u: torch.Tensor, share: float, t_min: float) -> torch.Tensor:
    """Times t on [t_min, 1] from uniform draws ``u`` (any shape), a ``share`` of them
    log-uniform and the rest uniform; weighted by 1/q(t), q = :func:`mix_density`,
    E[f(t)/q(t)] = ∫_{t_min}^1 f(t) dt for any f. u < share maps to
    the log-uniform part, the rest to the uniform one: stratified u stay stratified. For a
    uniform-state NELBO, whose integrand grows like log(1/t) near 0 — and like 1/(Vp + t)
    for a network that gives its input token a tiny probability p — this puts draws where the
    integral lies (docs/uniform.md, "Estimating the bound"); share = 0 is plain uniform
    sampling with weight 1 − t_min.

    Returns t in float64."""
    u = u.double()
    log_range = math.log(1.0 / t_min)
    if share > 0:
        t_log = t_min * torch.exp(log_range * (u / share).clamp_max(1.0))  # t_min · (1/t_min)^(u/share)
        t_uni = t_min + (1.0 - t_min) * ((u - share) / (1.0 - share)).clamp_min(0.0)
        t = torch.where(u < share, t_log, t_uni)
    else:
        t = t_min + (1.0 - t_min) * u
    return t


def mix_density(t: torch.Tensor, share: float, t_min: float) -> torch.Tensor:
    """The density on [t_min, 1] that :func:`log_uniform_mix` draws from."""
    return share / (t * math.log(1.0 / t_min)) + (1.0 - share) / (1.0 - t_min)


class Process(nn.Module, ABC):
    """A forward process over a data vocabulary of ``vocab_size`` tokens: the contract every
    registered process follows (``tests/test_contracts.py`` holds each one to it).

    * ``corrupt(x0, t, generator, fixed)`` → x_t ~ q(x_t | x0): identity at t = 0, a draw
      of the prior at t = 1, ``fixed`` positions untouched, the draws independent of ``fixed``;
    * ``prior(shape, generator, device)`` → x_1, what every sampler starts from (and what a
      hidden prompt shows under guidance and prompt dropout);
    * ``input_vocab_size``: the ids the network embeds (data tokens plus any absorbing state);
    * ``predicted(xt)`` → where the reverse step depends on the network (elsewhere nothing is
      scored and no logits are computed);
    * ``time(frac, t_min)`` → the times of uniform draws ``frac`` (continuous: [t_min, 1]);
    * ``marginal(x, t)`` / ``prior_probs()`` → q_t(· | x) and the prior of one token, for
      processes over token states (the contract tests hold ``corrupt`` and ``prior`` to them);
    * ``Settings``: a dataclass of the process's own settings (the run config's ``process:``
      section), ``NoSettings`` when it has none.

    The maths of a reverse step lives with the process too (``posterior``,
    ``unmask_probability``, ``reverse_log_probs``): samplers only loop over it.

    A process is an ``nn.Module``: one that learns something (embeddings, a noise schedule)
    registers its parameters, and ``Family.build_model`` makes it a submodule of the model
    (state-dict keys ``process.*``), so they are trained, checkpointed and moved with it. A
    process without parameters leaves the model exactly as before.
    """

    Settings: ClassVar[type] = NoSettings
    # True: the state is vectors (B, L, C), not ids (Gaussian diffusion); such a process offers
    # ``embed(x0)`` (the clean state of tokens) and ``moments(x0, t)`` → (mean (B, L, C), std (B,)) of
    # q(x_t | x0) in place of ``prior_probs`` / ``marginal``, which are distributions over tokens
    vector_state: ClassVar[bool] = False

    def __init__(self, vocab_size: int, schedule: Schedule, settings=None):
        super().__init__()
        self.vocab_size = vocab_size
        self.schedule = schedule
        self.settings = settings if settings is not None else self.Settings()

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

    def prior_probs(self, dtype=torch.float64) -> torch.Tensor:
        """(input_vocab_size,): the prior's distribution of one token (x_1 ~ prior)."""
        raise NotImplementedError(f"{type(self).__name__} has no distribution over tokens at t = 1")

    def marginal(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q_t(· | x), (…, input_vocab_size), for probability vectors ``x`` (…, V) over the data
        tokens (one-hot x0, or x_θ); ``t`` broadcastable to x's leading dims. Here
        α_t·x + (1 − α_t)·π with π the prior's distribution, in the dtype of x; a process whose
        noise is not a fixed mixture (GIDD's hybrid) overrides it."""
        alpha = self.schedule.alpha(t.double()).to(x.dtype)[..., None]
        pi = self.prior_probs(x.dtype).to(x.device)
        data = torch.nn.functional.pad(x, (0, pi.shape[-1] - x.shape[-1]))
        return alpha * data + (1.0 - alpha) * pi

    def predicted(self, xt: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: positions where the reverse step depends on the network."""
        return torch.ones(xt.shape[:2], dtype=torch.bool, device=xt.device)

    def time(self, frac: torch.Tensor, t_min: float) -> torch.Tensor:
        """Times t = t_min + (1 − t_min)·frac for uniform draws ``frac`` (B,)."""
        return t_min + (1.0 - t_min) * frac

