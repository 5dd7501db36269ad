"""The mask + uniform hybrid of GIDD (von Rütte et al. 2025, arXiv 2503.04482), in continuous time.

Per token independently, over V data tokens and [MASK] m = ``mask_id`` = V (derivation and
choices in docs/gidd.md):

    q_t(z | x) = α_t e_x + β_t π_t,          β_t = 1 − α_t,
    α_t = ᾱ_t / C_t,   β_t π_t = ((1 − ᾱ_t) e_m + c_t u) / C_t,
    c_t = B √(ᾱ_t (1 − ᾱ_t)),   C_t = 1 + c_t,   B = 2 p_u / (1 − p_u),

with ᾱ the run's schedule (``loglinear``: ᾱ_t = 1 − t, GIDD's own, where the forms above are
its ``HybridDiffusion`` with γ = 1) and u uniform over the V data tokens (x included). So
clean : mask : uniform = ᾱ : 1 − ᾱ : c: the uniform share c/C vanishes at both ends, is
largest where ᾱ = ½ and is exactly ``p_u`` there; t = 1 is all [MASK] (the prior), and
p_u = 0 is the masked process of the same schedule.

The forward CTMC (GIDD's) jumps from any state into z at rate r_t(z) = α_t d/dt(b_t(z)/α_t),
b_t = β_t π_t, which is ≥ 0 here because b/α = ((1 − ᾱ) e_m + c u)/ᾱ grows with t:

    r_t(m) = ρ_t / (C_t ᾱ_t),   r_t(y) = B ρ_t / (2 V C_t √(ᾱ_t (1 − ᾱ_t)))  (each data y),

ρ_t = −ᾱ'_t. Reverse posterior for s < t (Bayes on the Markov step q_{t|s}(z_t | z_s) =
α_{t|s} δ + b_{t|s}(z_t), α_{t|s} = α_t/α_s, b_{t|s} = b_t − α_{t|s} b_s ≥ 0), with x one-hot
x0 or the network's x_θ, in O(V) per position:

    q(z_s = k | z_t = i, x) = (α_{t|s} δ_{ik} + b_{t|s}(i)) · q_s(k | x) / q_t(i | x).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm.batch import keep_fixed
from dlm.processes.base import Process
from dlm.settings import setting

# ᾱ is kept above this in float64: at t = 1 exactly the weights ρ/ᾱ meet factors of ᾱ, and this gives their
# limits instead of 0/0, with gradients that stay inside float32 (no float32 t is that close to 1 but 1 itself)
TINY_ALPHA = 1e-12


@dataclass
class HybridSettings:
    # the share of uniform tokens where it peaks (ᾱ = ½, t = ½ for log-linear); 0: pure masking
    p_u: float = setting(0.0, lo=0, hi=1, hi_open=True)


class HybridProcess(Process):
    Settings = HybridSettings

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    @property
    def input_vocab_size(self) -> int:
        return self.vocab_size + 1

    @property
    def uniform_scale(self) -> float:
        """B = 2 p_u / (1 − p_u): c_t = B √(ᾱ(1 − ᾱ)), so c/C = p_u where ᾱ = ½."""
        p = self.settings.p_u
        return 2.0 * p / (1.0 - p)

    def predicted(self, xt):
        if self.settings.p_u == 0:  # no uniform token can occur: a data token is carried over, as in masking
            return xt == self.mask_id
        return torch.ones(xt.shape[:2], dtype=torch.bool, device=xt.device)  # a data token may be noise

    def mixing(self, t: torch.Tensor, floor: float = 0.0):
        """(α_t, b_t(m), b_t(y)) elementwise in the dtype of ``t``: the clean share, the mass on
        [MASK] and the mass on each one data token y (the uniform part; V·b_t(y) = c_t/C_t).
        ``floor``: ᾱ is kept above it (the ELBO's ``TINY_ALPHA``)."""
        a_bar = self.schedule.alpha(t).clamp(floor, 1.0)
        c = self.uniform_scale * torch.sqrt(a_bar * (1.0 - a_bar))
        C = 1.0 + c
        return a_bar / C, (1.0 - a_bar) / C, c / (C * self.vocab_size)

    def marginal(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q_t(· | x) = α_t x + b_t, (…, V + 1), for probability vectors x (…, V) (one-hot x0 or
        x_θ); ``t`` broadcastable to x's leading dims. In the dtype of x."""
        alpha, b_m, b_u = (v.to(x.dtype)[..., None] for v in self.mixing(t.double()))
        data = alpha * x + b_u
        return torch.cat([data, b_m.expand(*data.shape[:-1], 1)], -1)

    def elbo_weight(self, xt: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """w_t(z_t, x0) = r_t(z_t) / q_t(z_t | x0), float64, elementwise (GIDD's ELBO weight):

            z_t = m:       ρ / (ᾱ (1 − ᾱ))
            z_t = y ≠ x0:  ρ / (2 ᾱ (1 − ᾱ))               (a uniform token; p_u > 0)
            z_t = x0:      ρ / (2 ᾱ (1 − ᾱ)) · c / (V ᾱ + c)  (0 when p_u = 0)

        with ρ = −ᾱ'_t; independent of V and p_u but for the last."""
        td = t.double()
        a_bar = self.schedule.alpha(td).clamp(TINY_ALPHA, 1.0)
        rho = -self.schedule.alpha_prime(td)
        w_mask = rho / (a_bar * (1.0 - a_bar)).clamp_min(TINY_ALPHA)
        c = self.uniform_scale * torch.sqrt(a_bar * (1.0 - a_bar))
        w_own = 0.5 * w_mask * c / (self.vocab_size * a_bar + c)
        return torch.where(xt == self.mask_id, w_mask, torch.where(xt == x0, w_own, 0.5 * w_mask))

    def corrupt(self, x0, t, generator, fixed=None):
        """u < b(m) → [MASK]; b(m) ≤ u < b(m) + V b(y) → a uniform data token; else x0. The
        thresholds are computed in t's dtype, so at p_u = 0 the draws and the result are
        those of ``MaskedProcess`` (which masks where u < 1 − α_t); the uniform tokens are
        drawn only when p_u > 0."""
        _, b_m, b_u = (v[:, None] for v in self.mixing(t))  # (B, 1)
        u = torch.rand(x0.shape, generator=generator, device=x0.device)
        xt = torch.where(u < b_m, torch.full_like(x0, self.mask_id), x0)
        if self.settings.p_u > 0:
            noise = torch.randint(0, self.vocab_size, x0.shape, generator=generator, device=x0.device)
            xt = torch.where((u >= b_m) & (u < b_m + self.vocab_size * b_u), noise, xt)
        return keep_fixed(x0, xt, fixed)

    def prior(self, shape, generator, device):
        return torch.full(shape, self.mask_id, dtype=torch.long, device=device)

    def prior_probs(self, dtype=torch.float64):
        return torch.nn.functional.one_hot(torch.tensor(self.mask_id), self.input_vocab_size).to(dtype)

    def step_parts(self, t: torch.Tensor, s: torch.Tensor):
        """The reverse step t → s (s < t) as the pieces of the posterior, float64:
        (α_{t|s}, b_{t|s}(m), b_{t|s}(y), (α_s, b_s(m), b_s(y))), where
        q(z_s = k | z_t = i, x) ∝ (α_{t|s} δ_{ik} + b_{t|s}(i)) q_s(k | x)."""
        alpha_t, bm_t, bu_t = self.mixing(t.double())
        alpha_s, bm_s, bu_s = self.mixing(s.double())
        a_ts = alpha_t / alpha_s.clamp_min(TINY_ALPHA)
        return a_ts, (bm_t - a_ts * bm_s).clamp_min(0.0), (bu_t - a_ts * bu_s).clamp_min(0.0), (alpha_s, bm_s, bu_s)

    def posterior(self, xt: torch.Tensor, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """q(z_s | z_t, x) as probabilities (…, V + 1) for ``xt`` (…,) ids in [0, V], ``x`` (…, V)
        probability vectors (one-hot x0 or x_θ), t > s broadcastable to ``xt``. In x's dtype."""
        a_ts, bts_m, bts_u, (alpha_s, bm_s, bu_s) = self.step_parts(t, s)
        a_ts, bts_m, bts_u, alpha_s, bm_s, bu_s = (v.to(x.dtype)[..., None] for v in (a_ts, bts_m, bts_u, alpha_s, bm_s,
                                                                                      bu_s))
        q_s = torch.cat([alpha_s * x + bu_s, bm_s.expand(*x.shape[:-1], 1)], -1)  # (…, V + 1)
        at_xt = torch.zeros_like(q_s).scatter_(-1, xt[..., None], 1.0)  # e_{z_t}
        b_i = torch.where(xt[..., None] == self.mask_id, bts_m, bts_u)  # b_{t|s}(z_t)
        unnorm = (a_ts * at_xt + b_i) * q_s
        return unnorm / unnorm.sum(-1, keepdim=True)  # the sum is q_t(z_t | x) (Chapman–Kolmogorov)

