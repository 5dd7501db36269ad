"""Losses of Gaussian embedding diffusion (``processes/gaussian.py``).

``vlb`` — the continuous-time variational bound of VDM (Kingma et al. 2021, eq. 17) on token
embeddings, as Plaid trains it (arXiv 2305.18619): per target position, for t ~ U[0, 1],

    −log p(x) ≤ KL(q(z_1 | x) ‖ N(0, I))                               prior, at t = 1
              + E_{t, z_t} [ −½ SNR'(t) ‖e(x) − x̂_θ(z_t, t)‖² ]          diffusion
              + E_{z_0} [ −log p(x | z_0) ]                             reconstruction, at t = 0

with x̂_θ = Σ_v p_θ(v | z_t) e(v), the expectation of the embeddings under the network's x0
distribution, −SNR'(t) = γ'(t) SNR(t), and p(x | z_0) the nearest-embedding likelihood
(``GaussianProcess.reconstruction``). Summed over the target positions of a sequence, the
three terms bound −log p(target | context) of the discrete tokens: the context is held at its
clean embedding at every t, and the reconstruction maps z_0 to tokens. One network pass (at
z_t); the end terms need none. The reconstruction's z_0 noise is drawn in ``draw`` over the
whole batch (so ranks and chunks agree) and carried in :class:`GaussianCorrupted`.

``ce`` — CDCD's score interpolation (Dieleman et al. 2022, arXiv 2211.15089): the
cross-entropy −log p_θ(x0 | z_t) at every target position, t ~ U; not a bound (``dlm eval``
still reports the VLB).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlm.objectives.base import Corrupted, Objective, Scored, per_sequence, token_count
from dlm.processes.gaussian import GaussianProcess


@dataclass
class GaussianCorrupted(Corrupted):
    """A corrupted batch with the reconstruction term's noise ε0 (B, L, C) and, for a
    self-conditioned network, the rows (B,) bool whose network reads a first pass's estimate."""

    eps0: torch.Tensor | None = None
    self_cond: torch.Tensor | None = None

    def rows(self, sl) -> "GaussianCorrupted":
        part = super().rows(sl)
        return GaussianCorrupted(**{f.name: getattr(part, f.name) for f in dataclasses.fields(Corrupted)},
                                 eps0=None if self.eps0 is None else self.eps0[sl],
                                 self_cond=None if self.self_cond is None else self.self_cond[sl])


def with_fields(c: Corrupted, **changes) -> GaussianCorrupted:
    """``c`` as a :class:`GaussianCorrupted` (the fields it has kept) with ``changes``."""
    return GaussianCorrupted(**{**{f.name: getattr(c, f.name) for f in dataclasses.fields(c)}, **changes})


def denoised(logits: torch.Tensor, process: GaussianProcess) -> torch.Tensor:
    """x̂ = softmax(logits) @ E: (N, V) logits → (N, C), the expected clean embedding."""
    E = process.embeddings()
    with torch.autocast(E.device.type, enabled=False):  # float32 under a bf16 autocast: the bound weighs it by SNR
        return logits.to(E.dtype).softmax(-1) @ E


def diffusion_term(logits: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, process: GaussianProcess) -> torch.Tensor:
    """−½ SNR'(t) ‖e(x0) − x̂‖² at N positions, (N,) float64; logits (N, V), x0 (N,), t (N,)."""
    err = (process.embed(x0) - denoised(logits, process)).double().pow(2).sum(-1)
    return 0.5 * process.gamma_rate * process.snr(t) * err


def end_terms(x0: torch.Tensor, eps0: torch.Tensor, process: GaussianProcess) -> torch.Tensor:
    """Prior KL + reconstruction at N positions, (N,) float64."""
    return process.prior_kl(process.embed(x0)) + process.reconstruction(x0, eps0).double()


class GaussianVlb(Objective):
    """The continuous-time VLB of the module docstring (``vlb``; the bound ``dlm eval`` reports)."""

    name = "vlb"

    def draw(self, c: Corrupted, generator, process: GaussianProcess) -> GaussianCorrupted:
        eps0 = torch.randn((*c.x0.shape, process.embed_dim), generator=generator, device=c.x0.device)
        return with_fields(c, eps0=eps0)

    def __call__(self, logits, c: GaussianCorrupted, where, process: GaussianProcess) -> Scored:
        rows = where.nonzero(as_tuple=True)[0]
        x0 = c.x0[where]
        nats = diffusion_term(logits, x0, c.t[rows], process) + end_terms(x0, c.eps0[where], process)
        return Scored(per_sequence(nats, where), token_count(c.target))


class GaussianCrossEntropy(Objective):
    """CDCD's score-interpolation loss (``ce``): −log p_θ(x0 | z_t) summed over target positions."""

    name = "ce"

    def __call__(self, logits, c: Corrupted, where, process: GaussianProcess) -> Scored:
        nll = F.cross_entropy(logits.float(), c.x0[where], reduction="none")
        return Scored(per_sequence(nll, where), token_count(c.target))

    def token_weights(self, c, where, process):
        return where.float(), token_count(c.target)
