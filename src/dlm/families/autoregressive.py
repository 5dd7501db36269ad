"""The autoregressive baseline: a causal transformer trained with next-token cross-entropy."""

from __future__ import annotations

import torch

from dlm.families.base import Family
from dlm.objectives import AR_OBJECTIVES
from dlm.samplers import AutoregressiveSampler


class Autoregressive(Family):
    name = "ar"
    causal = True
    is_bound = False

    def __init__(self, cfg, vocab_size, eos_id):
        super().__init__(cfg, vocab_size, eos_id)
        if self.time_conditioned:
            raise ValueError("the autoregressive family has no time to condition on")
        self.objective = AR_OBJECTIVES.get(cfg.objective or "ce")()

    def _shift(self, x0):
        """[BOS, x0_1 … x0_{L−1}]: the block's first token is predicted from BOS alone, so
        the model scores all L tokens of a block, like the diffusion bound does."""
        bos = torch.full_like(x0[:, :1], self.eos_id)
        return torch.cat([bos, x0[:, :-1]], dim=1)

    def loss(self, model, x0, generator):
        return self.objective(model(self._shift(x0)), x0).mean() / x0.shape[1]

    def nll(self, model, x0, generator, mc_samples):
        return self.objective(model(self._shift(x0)), x0).double()

    def sample(self, model, num, length, prompt, generator, steps, options):
        return AutoregressiveSampler(options).sample(model, self.eos_id, num, length, prompt, generator)
