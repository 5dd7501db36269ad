"""The exponential moving average of the weights that ``dlm eval`` and ``dlm sample`` use."""

from __future__ import annotations

import torch


class EMA:
    """Exponential moving average of the weights, with the usual warm-up of the decay,
    min(decay, (1 + n) / (10 + n)), so short runs are not dominated by the initial weights.

    Built from the wrapped model, it is laid out like the weights: under FSDP2 each rank
    keeps the EMA of its own shards (DTensors), and the update is elementwise, shard by shard."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        return self._shadow

    @shadow.setter
    def shadow(self, value: dict[str, torch.Tensor]) -> None:
        self._shadow, self._lists = value, None  # a restored shadow: the lists are rebuilt

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """shadow ← d·shadow + (1 − d)·weights, as two foreach calls over lists built once
        (the state dict's tensors are views that follow the weights)."""
        d = min(self.decay, (1 + step) / (10 + step))
        if self._lists is None:
            live = model.state_dict()
            self._lists = ([self._shadow[k] for k in live], [v.detach() for v in live.values()])
        shadows, weights = self._lists
        torch._foreach_mul_(shadows, d)
        torch._foreach_add_(shadows, [w if w.dtype == torch.float32 else w.float() for w in weights], alpha=1 - d)
