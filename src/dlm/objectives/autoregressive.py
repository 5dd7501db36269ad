"""Next-token cross-entropy: the exact negative log-likelihood of a causal model."""

from __future__ import annotations

import torch

from dlm.objectives.masked import token_nll


class NextTokenCrossEntropy:
    """−log p(x0) = Σ_l −log p_θ(x0^l | x0^{<l}); logits[:, l] predicts x0[:, l]
    (the input is shifted right by one BOS token). Per-sequence nats (B,)."""

    name = "ce"

    def __call__(self, logits: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return token_nll(logits, x0).sum(-1)
