"""Losses of masked diffusion. Each maps (logits, x0, xt, t, process) to per-sequence nats (B,)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dlm.processes.masked import MaskedProcess


def token_nll(logits: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """−log p_θ(x0_l | x_t) at every position: (B, L, V), (B, L) → (B, L)."""
    B, L, V = logits.shape
    return F.cross_entropy(logits.reshape(B * L, V), x0.reshape(B * L), reduction="none").view(B, L)


class MDLMNelbo:
    """Continuous-time NELBO of masked diffusion (MDLM eq. 10), for α(0) = 1, α(1) = 0:

        −log p(x0) ≤ ∫₀¹ −α'_t / (1 − α_t) · E_q Σ_{l: x_t^l = m} −log p_θ(x0^l | x_t) dt.

    SUBS: the network never predicts [MASK] (its output layer has no such row) and unmasked
    positions carry over, so they cost nothing. A Monte Carlo estimate at one t per sequence.
    """

    name = "nelbo"

    def __call__(self, logits, x0, xt, t, process: MaskedProcess) -> torch.Tensor:
        masked = (xt == process.mask_id).float()
        return process.schedule.weight(t) * (token_nll(logits, x0) * masked).sum(-1)


class LLaDACrossEntropy:
    """LLaDA's objective (arXiv 2502.09992): masked cross-entropy divided by the masking
    probability 1 − α_t. Equal to the NELBO for the log-linear schedule, a reweighting for
    the others; ``dlm eval`` always reports the NELBO."""

    name = "llada"

    def __call__(self, logits, x0, xt, t, process: MaskedProcess) -> torch.Tensor:
        masked = (xt == process.mask_id).float()
        mask_prob = (1.0 - process.schedule.alpha(t)).clamp_min(1e-6)
        return (token_nll(logits, x0) * masked).sum(-1) / mask_prob
