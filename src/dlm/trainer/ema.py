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

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
