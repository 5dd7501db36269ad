"""Losses of masked diffusion.

Each objective says which ``positions`` (B, L) it scores and maps the logits at those
positions, (N, V), to per-sequence nats (B,). Only masked positions carry a loss in masked
diffusion, so the network's output layer runs on those alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dlm.processes.masked import MaskedProcess


def per_sequence(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Sum (N,) values taken at the true entries of ``positions`` (B, L) back per row: (B,)."""
    rows = positions.nonzero(as_tuple=True)[0]
    out = torch.zeros(positions.shape[0], dtype=values.dtype, device=values.device)
    return out.index_add_(0, rows, values)


class MaskedObjective:
    # True: the objective is estimated over the number k of masked tokens (the family masks
    # exactly k positions, k uniform on {1..L}) instead of over a time t.
    exact_count = False

    def positions(self, x0: torch.Tensor, xt: torch.Tensor, process: MaskedProcess) -> torch.Tensor:
        return xt == process.mask_id

    def masked_nll(self, logits, x0, positions) -> torch.Tensor:
        """Σ over masked l of −log p_θ(x0^l | x_t), per sequence: (B,)."""
        return per_sequence(F.cross_entropy(logits, x0[positions], reduction="none"), positions)


class MDLMNelbo(MaskedObjective):
    """Continuous-time NELBO of masked diffusion (MDLM eq. 10), for α(0) = 1, α(1) = 0:

        −log p(x0) ≤ ∫₀¹ −α'_t / (1 − α_t) · E_q Σ_{l: x_t^l = m} −log p_θ(x0^l | x_t) dt.

    SUBS: the network never predicts [MASK] (its output layer has no such row) and unmasked
    positions carry over, so they cost nothing. A Monte Carlo estimate at one t per sequence.
    """

    name = "nelbo"

    def __call__(self, logits, x0, xt, t, process: MaskedProcess, positions) -> torch.Tensor:
        return process.schedule.weight(t) * self.masked_nll(logits, x0, positions)


class LLaDACrossEntropy(MaskedObjective):
    """LLaDA's objective (arXiv 2502.09992): masked cross-entropy divided by the masking
    probability 1 − α_t. Equal to the NELBO for the log-linear schedule, a reweighting for
    the others; ``dlm eval`` always reports the NELBO."""

    name = "llada"

    def __call__(self, logits, x0, xt, t, process: MaskedProcess, positions) -> torch.Tensor:
        mask_prob = (1.0 - process.schedule.alpha(t)).clamp_min(1e-6)
        return self.masked_nll(logits, x0, positions) / mask_prob


class CountNelbo(MaskedObjective):
    """The same NELBO estimated over the number of masked tokens instead of time (RADD,
    Ou et al. 2024, arXiv 2406.03736; LLaDA eq. 6). For a model that does not see t,
    integrating t out of the continuous-time NELBO leaves, for any schedule,

        −log p(x0) ≤ Σ_{k=1}^{L} E_{S: |S| = k} [ mean_{l ∈ S} −log p_θ(x0^l | x0 with S masked) ]
                   = E_{k ~ U{1..L}} [ L/k · Σ_{l ∈ S} −log p_θ(x0^l | x_S) ].

    Same expectation as ``nelbo`` (exactly, under the log-linear schedule and a model
    without time conditioning), without the 1/t weights that make a few lightly-masked
    sequences dominate a batch: the per-token loss of a sequence never exceeds its largest
    token cross-entropy. Here ``t`` is k/L.
    """

    name = "nelbo-count"
    exact_count = True

    def __call__(self, logits, x0, xt, t, process: MaskedProcess, positions) -> torch.Tensor:
        k = positions.sum(-1).clamp_min(1)
        return x0.shape[1] / k * self.masked_nll(logits, x0, positions)
