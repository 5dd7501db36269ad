"""Losses of masked diffusion.

Only masked positions carry a loss in masked diffusion, so every objective here asks for
logits at the masked positions alone and the network's output layer runs only there. Each
is normalised by the number of target tokens of the sequence (the tokens its bound covers),
so that a loss is nats per target token, like the AR cross-entropy.
"""

from __future__ import annotations

import torch.nn.functional as F

from dlm.objectives.base import Corrupted, Objective, Scored, per_sequence, token_count
from dlm.processes.masked import MaskedProcess


class MaskedObjective(Objective):
    def score_mask(self, c: Corrupted):
        return (c.xt != c.x0) & c.target  # masked target positions (a hidden prompt is masked but not scored)

    def masked_nll(self, logits, c: Corrupted, where):
        """Σ over masked l of −log p_θ(x0^l | x_t), per sequence: (B,)."""
        return per_sequence(F.cross_entropy(logits, c.x0[where], reduction="none"), where)


class MDLMNelbo(MaskedObjective):
    """Continuous-time NELBO of masked diffusion (MDLM eq. 10), for α(0) = 1, α(1) = 0:

        −log p(x0) ≤ ∫₀¹ −α'_t / (1 − α_t) · E_q Σ_{l: x_t^l = m} −log p_θ(x0^l | x_t) dt.

    SUBS: the network never predicts [MASK] (its output layer has no such row) and unmasked
    positions carry over, so they cost nothing. A Monte Carlo estimate at one t per sequence.
    With clean context the same integral bounds −log p(target | context).
    """

    name = "nelbo"

    def __call__(self, logits, c, where, process: MaskedProcess) -> Scored:
        nats = process.schedule.weight(c.t) * self.masked_nll(logits, c, where)
        return Scored(nats, token_count(c.target))

    def token_weights(self, c, where, process: MaskedProcess):
        return process.schedule.weight(c.t)[:, None] * where, token_count(c.target)


class LLaDACrossEntropy(MaskedObjective):
    """LLaDA's objective (arXiv 2502.09992): masked cross-entropy divided by the masking
    probability 1 − α_t. Equal to the NELBO for the log-linear schedule, a reweighting for
    the others; ``dlm eval`` always reports the NELBO."""

    name = "llada"

    def __call__(self, logits, c, where, process: MaskedProcess) -> Scored:
        mask_prob = (1.0 - process.schedule.alpha(c.t)).clamp_min(1e-6)
        return Scored(self.masked_nll(logits, c, where) / mask_prob, token_count(c.target))

    def token_weights(self, c, where, process: MaskedProcess):
        mask_prob = (1.0 - process.schedule.alpha(c.t)).clamp_min(1e-6)
        return where / mask_prob[:, None], token_count(c.target)


class CountNelbo(MaskedObjective):
    """The same NELBO estimated over the number of masked tokens instead of time (RADD,
    Ou et al. 2024, arXiv 2406.03736; LLaDA eq. 6 and, with a prompt kept clean, its
    conditional estimator eq. 14). For a model that does not see t, integrating t out of the
    continuous-time NELBO leaves, for any schedule and a target of n tokens,

        −log p(target | context) ≤ E_{k ~ U{1..n}} [ n/k · Σ_{l ∈ S, |S| = k} −log p_θ(x0^l | x_S) ].

    Same expectation as ``nelbo`` (exactly, under the log-linear schedule and a model
    without time conditioning), without the 1/t weights that make a few lightly-masked
    sequences dominate a batch: the per-token loss of a sequence never exceeds its largest
    token cross-entropy. Here ``t`` is k/n.
    """

    name = "nelbo-count"
    by_count = True

    def __call__(self, logits, c, where, process: MaskedProcess) -> Scored:
        n = token_count(c.target)
        k = token_count(where).clamp_min(1)
        return Scored(n / k * self.masked_nll(logits, c, where), n)

    def token_weights(self, c, where, process: MaskedProcess):
        n = token_count(c.target)
        return (n / token_count(where).clamp_min(1))[:, None] * where, n
