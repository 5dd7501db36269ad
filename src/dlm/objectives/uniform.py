"""Losses of uniform-state diffusion: the exact NELBO, naive denoising cross-entropy, and
SDDLM's simple denoising loss with its anti-uniform regularisers (Zhu et al. 2025,
"Simple Denoising Diffusion Language Models", arXiv 2510.22926).

Every objective says which ``positions`` (B, L) it needs logits at (``None``: all of
them) and returns a scalar training loss. The NELBO also gives per-sequence nats, the
bound ``dlm eval`` reports for every uniform-state model, whatever trained it.

Choices the SDDLM paper leaves open (see docs/uniform.md for the reasons):

* ``naive`` and ``sddlm`` are plain cross-entropies with no time weighting (t uniform on
  [t_min, 1)) averaged over the tokens they score in the batch: per scored token, not per
  sequence. Dividing by the batch's count, not each sequence's, keeps a lightly corrupted
  sequence with two replaced tokens from weighing as much as a sequence of pure noise.
* The regulariser acts on the same replaced positions as the cross-entropy: the noisy
  token x_t is a wrong answer there (V2), and the random negatives (V1) are drawn there;
  a negative that happens to equal x0 is dropped. Its term is λ · mean log(p_θ(neg) + ε):
  minimising it pushes the negatives' probabilities down, and ε bounds it below by log ε,
  so a negative the model already rules out (p ≪ ε) stops contributing gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dlm.errors import DlmError
from dlm.processes.uniform import UniformProcess


class UniformObjective:
    name: str

    @classmethod
    def from_config(cls, cfg) -> "UniformObjective":
        """The objective with its settings from a ``RunConfig``."""
        return cls()

    def positions(self, x0: torch.Tensor, xt: torch.Tensor, noised: torch.Tensor) -> torch.Tensor | None:
        """Where the loss needs logits (B, L), or None for everywhere; ``noised`` marks the
        positions the forward process resampled."""
        return None

    def __call__(self, logits, x0, xt, t, process: UniformProcess, positions, generator) -> torch.Tensor:
        """Scalar loss in nats per scored token; logits (B, L, V), or (N, V) at ``positions``."""
        raise NotImplementedError


class UniformNelbo(UniformObjective):
    """The continuous-time NELBO of uniform-state diffusion (UDLM eq. 18, Duo eq. 9).

    For α(0) = 1 and α(1) = 0 the prior and reconstruction terms vanish and

        −log p(x0) ≤ ∫₀¹ E_{x_t ~ q(·|x0)} Σ_l f_t(x0^l, x_t^l, x_θ^l) dt,

    with, writing x̄ = V α_t e_{x0} + (1 − α_t) 1, x̄_θ = V α_t x_θ + (1 − α_t) 1 and
    i = x_t (so Σ_k x̄_k = V),

        f_t = −α'_t / (V α_t) · [ V/x̄_θ,i − V/x̄_i + Σ_k x̄_k/x̄_i · log( x̄_k x̄_θ,i / (x̄_θ,k x̄_i) ) ].

    It is the rate of KL between the true and the model's reverse transitions (a sum of
    generalised KL terms, each ≥ 0). Computed here in closed form: only Σ_k log x̄_θ,k,
    x̄_θ at x0 and at x_t need the (B, L, V) probabilities, through log1p so that the
    terms stay accurate when α_t → 0 and x̄_θ → 1; the rest is float64 scalars.
    """

    name = "nelbo"

    def per_sequence(self, logits, x0, xt, t, process: UniformProcess) -> torch.Tensor:
        V = process.vocab_size
        td = t.double()
        alpha = process.schedule.alpha(td)[:, None]  # (B, 1) float64
        rate = -process.schedule.alpha_prime(td)[:, None] / (V * alpha)
        p = logits.float().softmax(-1)  # (B, L, V)
        a32 = alpha.float()[..., None]
        floor = torch.log(1.0 - alpha).float()[..., None]  # x̄_θ ≥ 1 − α, also where α rounds to 1 in float32
        sum_log = torch.log1p(a32 * (V * p - 1.0)).clamp_min(floor).sum(-1).double()  # Σ_k log x̄_θ,k
        p_a = p.gather(-1, x0[..., None]).squeeze(-1).double()
        p_i = p.gather(-1, xt[..., None]).squeeze(-1).double()
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
        f = rate * ((own - model) / xbar_i + inv_gap)
        return f.sum(-1)  # (B,)

    def __call__(self, logits, x0, xt, t, process, positions, generator):
        return self.per_sequence(logits, x0, xt, t, process).mean() / x0.shape[1]


class NaiveDenoising(UniformObjective):
    """Denoising cross-entropy −log p_θ(x0 | x_t) at every position, unweighted."""

    name = "naive"

    def __call__(self, logits, x0, xt, t, process, positions, generator):
        return F.cross_entropy(logits.flatten(0, 1), x0.flatten())


class SDDLM(UniformObjective):
    """SDDLM: cross-entropy only where noise replaced the token, 1[x_t ≠ x0].

    Where x_t = x0 the network is not asked anything: its output layer does not even run
    there. ``reg_weight`` λ > 0 adds the anti-uniform regulariser of a subclass.

    ``where="noised"`` (dlm's addition, config ``sddlm.where``) scores every position the
    forward process resampled instead, the 1/V that drew x0 again included. There x_t is
    independent of x0, so the minimiser is p(x0 | the rest of x_t): exactly the x_θ that
    makes the plug-in reverse step the true one. Under "changed" the target is never the
    input token, and the network learns to give it almost no mass (docs/uniform.md).
    """

    name = "sddlm"
    regularised = False  # True: λ, ε and the number of negatives come from the ``sddlm`` config
    WHERE = {
        "changed": lambda x0, xt, noised: xt != x0,  # the paper's rule
        "noised": lambda x0, xt, noised: noised,
    }

    @classmethod
    def from_config(cls, cfg):
        r = cfg.sddlm
        if not cls.regularised:
            return cls(where=r.where)
        if r.reg_weight < 0 or r.reg_eps <= 0 or r.negatives < 1:
            raise DlmError(f"{cls.name} needs sddlm.reg_weight ≥ 0, sddlm.reg_eps > 0 and sddlm.negatives ≥ 1; "
                           f"got {r.reg_weight}, {r.reg_eps}, {r.negatives}")
        return cls(r.reg_weight, r.reg_eps, r.negatives, r.where)

    def __init__(self, reg_weight: float = 0.0, reg_eps: float = 1e-4, negatives: int = 1, where: str = "changed"):
        if where not in self.WHERE:
            raise DlmError(f"sddlm.where must be one of {', '.join(self.WHERE)}, got {where!r}")
        self.reg_weight, self.reg_eps, self.negatives, self.where = reg_weight, reg_eps, negatives, where

    def positions(self, x0, xt, noised):
        return self.WHERE[self.where](x0, xt, noised)

    def negatives_at(self, x0: torch.Tensor, xt: torch.Tensor, vocab_size: int, generator) -> torch.Tensor:
        """(N, K) negative token ids at the N scored positions; none by default."""
        return x0.new_empty((x0.shape[0], 0))

    def __call__(self, logits, x0, xt, t, process, positions, generator):
        target = x0[positions]  # (N,)
        if target.numel() == 0:
            return logits.sum() * 0.0  # nothing replaced in this batch: zero loss, graph kept
        logp = logits.float().log_softmax(-1)  # (N, V)
        ce = -logp.gather(-1, target[:, None]).mean()
        if self.reg_weight == 0.0:
            return ce
        neg = self.negatives_at(target, xt[positions], process.vocab_size, generator)  # (N, K)
        keep = neg != target[:, None]
        p_neg = logp.gather(-1, neg).exp()
        reg = (torch.log(p_neg + self.reg_eps) * keep).sum() / keep.sum().clamp_min(1)
        return ce + self.reg_weight * reg


class SDDLMRandomNegatives(SDDLM):
    """SDDLM-V1: ``negatives`` tokens drawn uniformly from the vocabulary per replaced
    position, their log-probabilities (plus ε inside the log) pushed down with weight λ."""

    name = "sddlm-v1"
    regularised = True

    def negatives_at(self, x0, xt, vocab_size, generator):
        return torch.randint(0, vocab_size, (x0.shape[0], self.negatives), generator=generator, device=x0.device)


class SDDLMInputNegative(SDDLM):
    """SDDLM-V2: the noisy input token x_t itself is the negative at each replaced position
    (it is wrong there by construction)."""

    name = "sddlm-v2"
    regularised = True

    def negatives_at(self, x0, xt, vocab_size, generator):
        return xt[:, None]
