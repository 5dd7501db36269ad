"""Next-token cross-entropy: the exact negative log-likelihood of a causal model."""

from __future__ import annotations

import torch

import torch.nn.functional as F


class NextTokenCrossEntropy:
    """−log p(x0) = Σ_l −log p_θ(x0^l | x0^{<l}); logits[:, l] predicts x0[:, l]
    (the input is shifted right by one BOS token). Per-sequence nats (B,)."""

    name = "ce"

    def __call__(self, logits: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        B, L, V = logits.shape
        return F.cross_entropy(logits.reshape(B * L, V), x0.reshape(B * L), reduction="none").view(B, L).sum(-1)
