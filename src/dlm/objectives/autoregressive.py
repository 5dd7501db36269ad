"""Next-token cross-entropy: the exact negative log-likelihood of a causal model."""

from __future__ import annotations

import torch.nn.functional as F

from dlm.objectives.base import Corrupted, Objective, Scored, per_sequence, token_count


class NextTokenCrossEntropy(Objective):
    """−log p(target | context) = Σ_{l ∈ target} −log p_θ(x0^l | x0^{<l}); the logit at
    position l predicts x0^l (the input is shifted right by one BOS token). Clean context
    (a prompt) is conditioned on and not scored; padding is neither."""

    name = "ce"

    def __call__(self, logits, c: Corrupted, where, process=None) -> Scored:
        ce = F.cross_entropy(logits, c.x0[where], reduction="none")  # (N,)
        return Scored(per_sequence(ce, where), token_count(where))

    def token_weights(self, c, where, process=None):
        return where.float(), token_count(where)
