"""Losses of the mask + uniform hybrid (GIDD, von Rütte et al. 2025, arXiv 2503.04482).

GIDD's continuous-time ELBO (its Theorem 3.x; derived for this process in docs/gidd.md): for
α_0 = 1 and q_1 = the all-[MASK] prior there is no prior or reconstruction term and

    −log p(x0) ≤ ∫₀¹ E_{z_t ~ q_t(·|x0)} Σ_l w_t(z_t^l, x0^l) · [ KL(q_t(·|x0^l) ‖ q_t(·|x_θ^l))
                                                              + D_IS(q_t(z_t^l|x0^l) / q_t(z_t^l|x_θ^l)) ] dt,

D_IS(r) = r − 1 − log r (Itakura–Saito), x_θ the network's p(x0 | z_t), q_t(·|x_θ) = α_t x_θ + b_t
the forward marginal of a probability vector, w_t = r_t(z)/q_t(z|x0) the process's weight
(``HybridProcess.elbo_weight``). The bracket is the sum over source states y of the forward
rate into z times the generalised KL of the true and the model's reverse rates, so each
part is ≥ 0; it is computed that way, part by part, so that nothing large cancels:

    KL = q̂_a φ(q_a / q̂_a) + b_u Σ_{k ≠ x0} ψ(α θ_k / b_u),   φ(r) = r log r − r + 1,  ψ(y) = y − log(1 + y),

with a = x0, q_a = α + b_u, q̂_a = α θ_a + b_u, b_u = b_t(y) the uniform mass of one token
(b_u Σ ψ → α (1 − θ_a) as b_u → 0: at p_u = 0 the KL is −α log θ_a and the ELBO is MDLM's
NELBO), and D_IS(q_z/q̂_z) = 0 at z = m, d − log(1 + d) at z = x0 (q_a/q̂_a = 1 + d), and
log(1 + y_z) − y_z/(1 + y_z) at a uniform token z (y_z = α θ_z / b_u).

The (N, V) part runs in float32 (float64 logits stay float64); scalars are float64. The
sum runs over target positions only: with clean context it bounds −log p(target | context).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm.objectives.base import Corrupted, Objective, Scored, per_sequence, token_count
from dlm.processes.hybrid import TINY_ALPHA, HybridProcess
from dlm.settings import setting


def _phi_of(d: torch.Tensor) -> torch.Tensor:
    """φ(1 + d) = (1 + d) log(1 + d) − d ≥ 0."""
    return ((1.0 + d) * torch.log1p(d) - d).clamp_min(0.0)


def _own_terms(log_theta_a, rest, alpha, b_u, use):
    """The x0 parts at N positions, float64: q̂_a φ(q_a/q̂_a) (its KL term) and D_IS(q_a/q̂_a)
    (read only where ``use``: elsewhere 0, so no exp overflows, not even in the backward).
    From log θ_a (a network that rules x0 out costs much, never inf or nan); where the ratio is
    close to 1 from d = α (1 − θ_a)/q̂_a, which keeps the relative precision of 1 − θ_a."""
    q_a = alpha + b_u
    log_q_hat = torch.logaddexp(alpha.log() + log_theta_a, b_u.log())  # log(α θ_a + b_u); log 0 = −inf is fine
    log_r = (q_a.log() - log_q_hat).clamp_min(0.0)
    near = log_r < 1e-2
    q_hat = torch.where(near, log_q_hat.exp(), 1.0)
    d = torch.where(near, alpha * rest / q_hat, 0.0)
    kl = torch.where(near, q_hat * _phi_of(d), (q_a * log_r - alpha * rest).clamp_min(0.0))
    far = torch.where(near | ~use, 0.0, log_r)
    d_is = torch.where(near, d - torch.log1p(d), torch.expm1(far) - far)
    return kl, torch.where(use, d_is, 0.0)


def elbo_terms(logits: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, process: HybridProcess):
    """(w, D) at N positions, float64 (N,): the ELBO weight w_t(z_t, x0) and the bracket
    KL + D_IS; logits (N, V), x0 / xt (N,) ids, t (N,) each position's time. f_t = w · D."""
    V = process.vocab_size
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    log_theta = logits.to(work).log_softmax(-1)  # (N, V)
    theta = log_theta.exp()
    alpha, _, b_u = process.mixing(t.double(), TINY_ALPHA)  # (N,) float64, ᾱ ≥ TINY_ALPHA like the weight
    own = x0[:, None]
    rest = theta.scatter(-1, own, 0.0).sum(-1).double()  # 1 − θ_a, without the rounding of 1 − θ_a
    live = b_u > 0  # uniform tokens exist at this t (p_u > 0, 0 < t < 1)
    kept = xt == x0
    kl, d_is_own = _own_terms(log_theta.gather(-1, own)[:, 0].double(), rest, alpha, b_u, kept & live)
    ratio = torch.where(live, alpha / torch.where(live, b_u, 1.0), 0.0)  # α / b_u
    if process.settings.p_u > 0:
        y = theta * ratio.to(work)[:, None]
        psi = (y - torch.log1p(y)).clamp_min(0.0).scatter(-1, own, 0.0).sum(-1).double()
        kl = kl + torch.where(live, b_u * psi, alpha * rest)
    else:
        kl = kl + alpha * rest  # b_u Σ ψ(α θ_k / b_u) → α Σ_{k≠a} θ_k as b_u → 0
    theta_i = theta.gather(-1, xt.clamp_max(V - 1)[:, None])[:, 0].double()  # (read where z_t is a data token)
    y_i = ratio * theta_i
    d_is = torch.where(kept, d_is_own,  # (0 where b_u = 0: there w_t(x0, x0) = 0)
                       (torch.log1p(y_i) - y_i / (1.0 + y_i)).clamp_min(0.0))
    d_is = torch.where(xt == process.mask_id, 0.0, d_is)  # q_t(m | x0) = q_t(m | x_θ): D_IS(1) = 0
    return process.elbo_weight(xt, x0, t), kl + d_is


class HybridObjective(Objective):
    """Scored over every target position the process predicts (where ``score_mask`` meets
    ``HybridProcess.predicted``), normalised by the target tokens of each sequence."""

    def weights(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def __call__(self, logits, c: Corrupted, where, process: HybridProcess) -> Scored:
        rows = where.nonzero(as_tuple=True)[0]
        w, div = elbo_terms(logits, c.x0[where], c.xt[where], c.t[rows], process)
        return Scored(per_sequence(self.weights(w) * div, where), token_count(c.target))


class GiddElbo(HybridObjective):
    """GIDD's exact continuous-time ELBO (the bound ``dlm eval`` reports for every ``gidd`` run)."""

    name = "elbo"


@dataclass
class ClippedSettings:
    max_weight: float = setting(2.0, lo=0, lo_open=True)  # w_max: the ELBO weight is clipped to [min_weight, w_max]
    min_weight: float = setting(0.0, lo=0)


class GiddClipped(HybridObjective):
    """GIDD's clipped weighting: the ELBO's bracket with its weight w_t(z_t, x0) clipped to
    [``min_weight``, ``max_weight``] (GIDD's ``loss_weighting: clip``; its code's defaults
    0 and 2). Not a bound: a training loss that keeps the 1/t weights of nearly clean
    times from dominating a batch; ``dlm eval`` still reports the ELBO."""

    name = "clipped"
    Settings = ClippedSettings

    def weights(self, w):
        return w.clamp(self.settings.min_weight, max(self.settings.max_weight, self.settings.min_weight))
