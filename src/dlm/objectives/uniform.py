"""Losses of uniform-state diffusion: the exact NELBO, naive denoising cross-entropy, and
SDDLM's simple denoising loss with its anti-uniform regularisers (Zhu et al. 2025,
"Simple Denoising Diffusion Language Models", arXiv 2510.22926).

Every objective follows the contract of ``objectives/base.py``: the positions it needs
logits at, then per-sequence nats and the tokens they are normalised by. The NELBO's
per-sequence nats are also the bound ``dlm eval`` reports for every uniform-state model,
whatever trained it.

Choices the SDDLM paper leaves open (see docs/uniform.md for the reasons):

* ``naive`` and ``sddlm`` are plain cross-entropies with no time weighting (t uniform on
  [t_min, 1)) averaged over the tokens they score in the batch: per scored token, not per
  sequence (and over the whole optimiser step: every micro-batch and rank). Dividing by
  the step's count, not each sequence's, keeps a lightly corrupted
  sequence with two replaced tokens from weighing as much as a sequence of pure noise.
* The regulariser acts on the same replaced positions as the cross-entropy: the noisy
  token x_t is a wrong answer there (V2), and the random negatives (V1) are drawn there;
  a negative that happens to equal x0 is dropped. Each scored position adds
  λ · (1/K) Σ_k log(p_θ(neg_k) + ε) over its K negatives (a dropped one adds 0), and the
  sum is normalised by the same count as the cross-entropy: minimising it pushes the
  negatives' probabilities down, and ε bounds it below by log ε, so a negative the model
  already rules out (p ≪ ε) stops contributing gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dlm.settings import setting
from dlm.objectives.base import Corrupted, Objective, Scored, per_sequence, token_count
from dlm.processes.uniform import UniformProcess


class UniformNelbo(Objective):
    """The continuous-time NELBO of uniform-state diffusion (UDLM eq. 18, Duo eq. 9).

    For α(0) = 1 and α(1) = 0 the prior and reconstruction terms vanish and

        −log p(x0) ≤ ∫₀¹ E_{x_t ~ q(·|x0)} Σ_l f_t(x0^l, x_t^l, x_θ^l) dt,

    with, writing x̄ = V α_t e_{x0} + (1 − α_t) 1, x̄_θ = V α_t x_θ + (1 − α_t) 1 and
    i = x_t (so Σ_k x̄_k = V),

        f_t = −α'_t / (V α_t) · [ V/x̄_θ,i − V/x̄_i + Σ_k x̄_k/x̄_i · log( x̄_k x̄_θ,i / (x̄_θ,k x̄_i) ) ].

    It is the rate of KL between the true and the model's reverse transitions, a sum of
    generalised KL terms D(r, ρ) = r log(r/ρ) − r + ρ ≥ 0 over the jumps k ≠ i, with
    r_k = x̄_k/x̄_i and ρ_k = x̄_θ,k/x̄_θ,i — and that sum is how it is computed here, term by
    term, so that f_t is never negative and stays accurate where it is tiny (a confident
    model at t → 1). Divided by 1 − α_t, x̄ and x̄_θ are R_k = 1 + cV [k = x0] and
    P_k = 1 + cV x_θ,k with c = α/(1 − α), and

        f_t = −α'_t / (V α_t P_i) · Σ_{k≠i} D(r_k P_i, P_k),   D(h, P) = h ψ((P − h)/h),
        ψ(x) = x − log(1 + x) ≥ 0.

    Every k ∉ {i, x0} has the same r_k P_i =: h (P_i / R_x0 where x_t = x0, P_i where not),
    so the (N, V) part is one sum Σ_k ψ(x_k), x_k = cV (x_θ,k − g)/h, with
    g = −(1 − x_θ,i)/(1 + cV) or x_θ,i — a difference of small terms written so that nothing
    large cancels; it runs in float32 (log(1 + x_k) = log(P_k) − log h, exact where either is
    small) with its own backward (JumpSum). The k = x0 term of a changed position and every
    scalar are float64. A former closed form (Σ_k log x̄_θ,k against V log x̄_θ,i) lost up
    to 3·10⁻² nats at V = 50,257 near t = 1 and came out negative where f_t is tiny.

    ``carry`` λ (``dlm eval --carry``): the bound of the model whose x_θ is
    (1 − λ) softmax(logits) + λ e_{x_t}: any probability vector is a valid x_θ (the NELBO
    bounds the likelihood of the reverse process it defines), and this one restores the
    input token that an SDDLM-trained network learns to deny (docs/uniform.md). The sum runs
    over target positions only: with clean context it bounds −log p(target | context).
    """

    name = "nelbo"

    def __init__(self, settings=None, carry: float = 0.0):
        super().__init__(settings)
        self.carry = carry

    def per_position(self, logits, x0, xt, t, process: UniformProcess) -> torch.Tensor:
        """f_t at N positions: logits (N, V), x0 / xt (N,) token ids, t (N,) each one's time, 0 < t < 1."""
        V = process.vocab_size
        lam = self.carry
        td = t.double()
        alpha = process.schedule.alpha(td)  # (N,) float64
        rate = -process.schedule.alpha_prime(td) / (V * alpha)
        cV = V * alpha / (1.0 - alpha)
        p = logits.float().softmax(-1)  # (N, V)
        # a float32 softmax sums to 1 only within ~1e-5 at 50k tokens (its own normaliser), an
        # error the bound multiplies by up to V: divide it out with Tensor.sum's pairwise sum
        # (~1e-7). Σ_k p_k ≡ 1, so the divisor carries no gradient.
        norm = p.sum(-1).detach().double()
        p_i = p.gather(-1, xt[:, None])[:, 0].double() / norm
        p_a = p.gather(-1, x0[:, None])[:, 0].double() / norm
        p_i, q_i = (1 - lam) * p_i + lam, (1 - lam) * (1.0 - p_i)  # with the carry; q = 1 − x_θ
        p_a, q_a = (1 - lam) * p_a, 1.0 - (1 - lam) * p_a  # (only read where x0 ≠ x_t)
        same = xt == x0
        P_i = 1.0 + cV * p_i
        h = torch.where(same, P_i / (1.0 + cV), P_i)
        offset = cV * torch.where(same, q_i / (1.0 + cV), -p_i) / h  # x_k = y_k / h + offset
        skip = torch.stack([xt, x0], -1)  # k = x_t is no jump; k = x0 (≠ x_t) is the float64 term below
        scale = (cV * (1 - lam) / norm).float()
        bulk = JumpSum.apply(p, scale, (1.0 / h).float(), (offset + h.log()).float(), skip).double() * h / P_i
        # k = x0 where x_t ≠ x0: D(h_a, P_a) / P_i with h_a = (1 + cV) P_i, x_a = (P_a − h_a)/h_a
        h_a = (1.0 + cV) * P_i
        x_a = -cV * (q_a + p_i * (1.0 + cV)) / h_a
        log_ratio = torch.log1p(cV * p_a) - torch.log1p(cV) - torch.log(P_i)  # log(P_a / h_a)
        own = torch.where(same, torch.zeros_like(x_a), (1.0 + cV) * (x_a - log_ratio).clamp_min(0.0))
        return rate * (bulk + own)  # (N,) float64

    def __call__(self, logits, c: Corrupted, where, process) -> Scored:
        rows = where.nonzero(as_tuple=True)[0]
        f = self.per_position(logits, c.x0[where], c.xt[where], c.t[rows], process)
        return Scored(per_sequence(f, where), token_count(c.target))

    # ---- ∫_0^ε, the piece the Monte Carlo over t ∈ [ε, 1) omits (families/usdm.py) ----------
    #
    # Substituting α for t, ∫_0^ε −α'(t) F(α(t)) dt = ∫_{α_ε}^1 F(α) dα: every bound below holds
    # for any schedule through α_ε = α(ε) alone. x_θ on [0, ε) is the network's at time ε.

    def kept_tail(self, logp: torch.Tensor, alpha_eps: float, V: int, next_to_change: bool = False) -> torch.Tensor:
        """Upper bound on ∫_0^ε f_t dt at a position with x_t = x0 whose x_θ(x0) = p (N,), from log p.

        There f_t ≤ g_t = −α' V (1 − p) / ((V α p + 1 − α)(V α + 1 − α)) (the dropped log
        terms are ≤ 0), and ∫_{α_ε}^1 of it in closed form (partial fractions) is

            K(p) = log[(α_ε + (1 − α_ε)/(V p)) / (α_ε + (1 − α_ε)/V)]  ≈ ε (1/p − 1)/V,

        finite for every p > 0 and infinite at p = 0: the one part of the tail that no bound
        free of the model can cover (a network that denies its input token pays it here).

        ``next_to_change``: the same position while one other position has changed, weighted
        by that change's probability (1 − α)(V − 1)/V (the estimator of families/usdm.py
        multiplies by the number of positions):

            K₁(p) = ∫ (1 − α)(V − 1)/V g dt ≤ (V − 1)(1 − p)/(V − (V − 1) δ) · J,
            J = ∫_0^δ min(u/m, 1) du,  m = V p (1 − δ),  δ = 1 − α_ε,

        (1 + (V − 1)α ≥ V − (V − 1)δ and V p α + 1 − α ≥ max(m, u) with u = 1 − α), which is
        ≈ ε² (V − 1)/(2 V² p), and δ (V − 1)/V at p = 0."""
        lam = self.carry
        logp = torch.logaddexp(logp + math.log1p(-lam), torch.full_like(logp, math.log(lam) if lam else -math.inf))
        delta = 1.0 - alpha_eps
        if not next_to_change:
            return torch.logaddexp(torch.full_like(logp, math.log(alpha_eps)), math.log(delta / V) - logp) - math.log(
                alpha_eps + delta / V)
        p = logp.exp()
        m = V * p * (1.0 - delta)
        J = torch.where(m >= delta, delta * delta / (2.0 * m), delta - m / 2.0)
        return (V - 1) * (1.0 - p) / (V - (V - 1) * delta) * J

    @staticmethod
    def changed_bound(V: int, noise: np.ndarray) -> np.ndarray:
        """Φ(α)/(V α) ≥ f_t/(−α'_t) at a position with x_t ≠ x0, for any x_θ, of noise = 1 − α
        (given as such: 1 − α is what must stay accurate as t → 0).

        With c = α/(1 − α), R = V (1 + c) − 1 and P_k = 1 + cV x_θ,k ≥ 1, the jump sum is at
        most Φ = (1 + cV) log(1 + cV) − R − 1 + max_{P_i ∈ [1, 1 + cV]} [V (1 + c)/P_i + R log P_i]
        (each −log P_k ≤ 0; the bracket is largest at an end, and at P_i = 1 + cV — all mass on
        the wrong input token — Φ is attained)."""
        alpha = 1.0 - noise
        c = alpha / noise
        R = V * (1.0 + c) - 1.0
        big = np.log1p(c * V)
        phi = (1.0 + c * V) * big - R - 1.0 + np.maximum(V * (1.0 + c), V * (1.0 + c) / (1.0 + c * V) + R * big)
        return phi / (V * alpha)

    @staticmethod
    def changed_tail(V: int, alpha_eps: float, nodes: int = 64) -> float:
        """Upper bound, for any x_θ, on ∫_0^ε E[f_t 1{x_t ≠ x0}] dt at one position: with
        P(x_t ≠ x0) = (1 − α)(V − 1)/V and ``changed_bound``,

            ∫_{α_ε}^1 (1 − α)(V − 1)/V · Φ(α)/(V α) dα  ≈ ε (V − 1)/V (2 log(V/ε) + 1),

        whose integrand grows like 2 log(1/(1 − α)); with 1 − α = δ w², Gauss–Legendre in w.
        (A model pays about half of this: its integrand grows like (V − 1)/V log(1/t).)"""
        delta = 1.0 - alpha_eps
        w, wt = np.polynomial.legendre.leggauss(nodes)
        w, wt = (w + 1.0) / 2.0, wt / 2.0
        u = delta * w * w  # 1 − α
        integrand = u * (V - 1) / V * UniformNelbo.changed_bound(V, u)
        return float((integrand * 2.0 * delta * w * wt).sum())

    @staticmethod
    def crowded_tail(n: torch.Tensor, V: int, alpha_eps: float) -> torch.Tensor:
        """Upper bound, for any x_θ, on ∫_0^ε of f_t at the kept positions of a sequence of n
        target positions (n,) while two or more others have changed: P ≤ C(n − 1, 2) ((1 − α)(V − 1)/V)²,
        f_t ≤ g_t(p = 0) = −α' V / ((1 − α)(V α + 1 − α)), so per sequence

            n C(n − 1, 2) (V − 1)²/V · ∫_{α_ε}^1 (1 − α)/(1 + (V − 1) α) dα
            ≤ n C(n − 1, 2) (V − 1)²/V · δ² / (2 (1 + (V − 1) α_ε)),   ≈ n³ ε²/4."""
        n = n.double()
        delta = 1.0 - alpha_eps
        return n * (n - 1) * (n - 2) / 2 * (V - 1) ** 2 / V * delta**2 / (2 * (1 + (V - 1) * alpha_eps))


class JumpSum(torch.autograd.Function):
    """Σ_k ψ(x_k) over the jumps k ∉ ``skip`` of each row, from x_θ:

        S = Σ_{k ∉ skip} max(0, u y_k + k0 − log(1 + y_k)),   y_k = c x_θ,k,

    (N,) float32 from x_θ (N, V) and per-row c, u = 1/h, k0 = offset + log h (N,). Each term
    is ψ ≥ 0 up to rounding, which the max(0, ·) removes. The backward is that of the sum
    without the max (a clamped term is a rounded zero):

        ∂S/∂x_θ,k = c (u − 1/(1 + y_k)),   ∂S/∂u = Σ_k y_k,   ∂S/∂k0 = number of terms,

    two passes over (N, V) where autograd through the elementwise chain makes about ten (the
    per-row u and k0 each need a reduction): the NELBO's backward costs what the former closed
    form's did. c is a function of t alone and gets no gradient."""

    @staticmethod
    def forward(ctx, x, c, u, k0, skip):
        y = x * c[:, None]
        psi = torch.log1p(y).neg_().addcmul_(y, u[:, None]).add_(k0[:, None])
        total = psi.clamp_min_(0.0).scatter_(-1, skip, 0.0).sum(-1)
        ctx.save_for_backward(x, c, u, skip)
        ctx.sum_y = y.scatter_(-1, skip, 0.0).sum(-1)
        ctx.terms = x.shape[-1] - (skip[:, 0] != skip[:, 1]).to(x.dtype) - 1.0
        return total

    @staticmethod
    def backward(ctx, grad):
        x, c, u, skip = ctx.saved_tensors
        dx = torch.reciprocal((x * c[:, None]).add_(1.0)).neg_().add_(u[:, None]).mul_((grad * c)[:, None])
        return dx.scatter_(-1, skip, 0.0), None, grad * ctx.sum_y, grad * ctx.terms, None


class NaiveDenoising(Objective):
    """Denoising cross-entropy −log p_θ(x0 | x_t) at every target position, unweighted."""

    name = "naive"

    def __call__(self, logits, c, where, process) -> Scored:
        ce = F.cross_entropy(logits, c.x0[where], reduction="none")
        return Scored(per_sequence(ce, where), token_count(where))

    def token_weights(self, c, where, process):
        return where.float(), token_count(where)


@dataclass
class SDDLMSettings:
    # positions scored: changed (x_t ≠ x0, the paper's) | noised (resampled, x0 redrawn included)
    where: str = setting("changed", choices=("changed", "noised"))


@dataclass
class SDDLMInputNegativeSettings(SDDLMSettings):
    reg_weight: float = setting(0.1, lo=0)  # λ: weight of mean log(p_θ(negative) + ε) in the loss
    reg_eps: float = setting(1e-4, lo=0, lo_open=True)  # ε inside the log: bounds the term below by log ε


@dataclass
class SDDLMRandomNegativesSettings(SDDLMInputNegativeSettings):
    negatives: int = setting(1, lo=1)  # negatives drawn uniformly from the vocabulary per scored position


class SDDLM(Objective):
    """SDDLM: cross-entropy only where noise replaced the token, 1[x_t ≠ x0].

    Where x_t = x0 the network is not asked anything: its output layer does not even run
    there. Subclasses add the anti-uniform regulariser with weight ``reg_weight`` λ.

    ``where="noised"`` (dlm's addition) scores every position the forward process resampled
    instead, the 1/V that drew x0 again included. There x_t is independent of x0, so the
    minimiser is p(x0 | the rest of x_t): exactly the x_θ that makes the plug-in reverse
    step the true one. Under "changed" the target is never the input token, and the network
    learns to give it almost no mass (docs/uniform.md).
    """

    name = "sddlm"
    Settings = SDDLMSettings

    def score_mask(self, c: Corrupted):
        chosen = c.xt != c.x0 if self.settings.where == "changed" else c.noised
        return chosen & c.target

    def negatives_at(self, c: Corrupted, where) -> torch.Tensor | None:
        """(N, K) negative token ids at the N scored positions; None: no regulariser."""
        return None

    def __call__(self, logits, c, where, process) -> Scored:
        target = c.x0[where]  # (N,)
        logp = logits.float().log_softmax(-1)  # (N, V)
        loss = -logp.gather(-1, target[:, None])[:, 0]
        neg = self.negatives_at(c, where)
        if neg is not None:
            keep = neg != target[:, None]  # a negative equal to the answer is dropped
            log_p = torch.log(logp.gather(-1, neg).exp() + self.settings.reg_eps)  # (N, K)
            loss = loss + self.settings.reg_weight * (log_p * keep).sum(-1) / neg.shape[1]
        return Scored(per_sequence(loss, where), token_count(where))

    def token_weights(self, c, where, process):
        """A weighted cross-entropy without the regulariser only (its log(p_θ(negative) + ε)
        term is not one: SDDLM-V1 and V2 keep the plain head)."""
        if type(self).negatives_at is not SDDLM.negatives_at:
            return None
        return where.float(), token_count(where)


class SDDLMRandomNegatives(SDDLM):
    """SDDLM-V1: ``negatives`` tokens drawn uniformly from the vocabulary per replaced
    position, their log-probabilities (plus ε inside the log) pushed down with weight λ."""

    name = "sddlm-v1"
    Settings = SDDLMRandomNegativesSettings

    def draw(self, c, generator, process):
        B, L = c.x0.shape
        shape = (B, L, self.settings.negatives)
        c.negatives = torch.randint(0, process.vocab_size, shape, generator=generator, device=c.x0.device)
        return c

    def negatives_at(self, c, where):
        return c.negatives[where]


class SDDLMInputNegative(SDDLM):
    """SDDLM-V2: the noisy input token x_t itself is the negative at each replaced position
    (it is wrong there by construction)."""

    name = "sddlm-v2"
    Settings = SDDLMInputNegativeSettings

    def negatives_at(self, c, where):
        return c.xt[where][:, None]
