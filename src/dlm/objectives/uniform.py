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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlm.config import setting
from dlm.objectives.base import Corrupted, Objective, Scored, per_sequence, token_count
from dlm.processes.uniform import UniformProcess


class UniformNelbo(Objective):
    """The continuous-time NELBO of uniform-state diffusion (UDLM eq. 18, Duo eq. 9).

    For α(0) = 1 and α(1) = 0 the prior and reconstruction terms vanish and

        −log p(x0) ≤ ∫₀¹ E_{x_t ~ q(·|x0)} Σ_l f_t(x0^l, x_t^l, x_θ^l) dt,

    with, writing x̄ = V α_t e_{x0} + (1 − α_t) 1, x̄_θ = V α_t x_θ + (1 − α_t) 1 and
    i = x_t (so Σ_k x̄_k = V),

        f_t = −α'_t / (V α_t) · [ V/x̄_θ,i − V/x̄_i + Σ_k x̄_k/x̄_i · log( x̄_k x̄_θ,i / (x̄_θ,k x̄_i) ) ].

    It is the rate of KL between the true and the model's reverse transitions (a sum of
    generalised KL terms, each ≥ 0). Computed here in closed form: only Σ_k log x̄_θ,k,
    x̄_θ at x0 and at x_t need the (N, V) probabilities, through log1p so that the
    terms stay accurate when α_t → 0 and x̄_θ → 1; the rest is float64 scalars. The sum runs
    over target positions only: with clean context it bounds −log p(target | context).
    """

    name = "nelbo"

    def per_position(self, logits, x0, xt, t, process: UniformProcess) -> torch.Tensor:
        """f_t at N positions: logits (N, V), x0 / xt (N,) token ids, t (N,) each one's time."""
        V = process.vocab_size
        td = t.double()
        alpha = process.schedule.alpha(td)  # (N,) float64
        rate = -process.schedule.alpha_prime(td) / (V * alpha)
        p = logits.float().softmax(-1)  # (N, V)
        a32 = alpha.float()[:, None]
        floor = torch.log(1.0 - alpha).float()[:, None]  # x̄_θ ≥ 1 − α, also where α rounds to 1 in float32
        sum_log = torch.log1p(a32 * (V * p - 1.0)).clamp_min(floor).sum(-1).double()  # Σ_k log x̄_θ,k
        p_a = p.gather(-1, x0[:, None])[:, 0].double()
        p_i = p.gather(-1, xt[:, None])[:, 0].double()
        log_xbt_a = torch.log1p(alpha * (V * p_a - 1.0))
        log_xbt_i = torch.log1p(alpha * (V * p_i - 1.0))
        noise = 1.0 - alpha  # x̄ off x0
        hit = V * alpha + noise  # x̄ at x0
        same = xt == x0
        xbar_i = torch.where(same, hit, noise)
        # Σ_k x̄_k log x̄_k − V log x̄_i, split by case to avoid cancelling large terms
        own = torch.where(
            same,
            (V - 1) * torch.special.xlogy(noise, noise / hit),  # (V−1)(1−α) log((1−α)/x̄_a)
            hit * torch.log(hit / noise),
        )
        model = noise * sum_log + V * alpha * log_xbt_a - V * log_xbt_i  # Σ_k x̄_k log x̄_θ,k − V log x̄_θ,i
        xbt_i = V * alpha * p_i + noise
        inv_gap = V * V * alpha * (same.double() - p_i) / (xbar_i * xbt_i)  # V/x̄_θ,i − V/x̄_i
        return rate * ((own - model) / xbar_i + inv_gap)  # (N,) float64

    def __call__(self, logits, c: Corrupted, where, process) -> Scored:
        rows = where.nonzero(as_tuple=True)[0]
        f = self.per_position(logits, c.x0[where], c.xt[where], c.t[rows], process)
        return Scored(per_sequence(f, where), token_count(c.target))


class NaiveDenoising(Objective):
    """Denoising cross-entropy −log p_θ(x0 | x_t) at every target position, unweighted."""

    name = "naive"

    def __call__(self, logits, c, where, process) -> Scored:
        ce = F.cross_entropy(logits, c.x0[where], reduction="none")
        return Scored(per_sequence(ce, where), token_count(where))


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
