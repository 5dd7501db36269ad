"""The autoregressive baseline: a causal transformer trained with next-token cross-entropy."""

from __future__ import annotations

import torch

from dlm.errors import DlmError
from dlm.families.base import Family
from dlm.objectives import Corrupted
from dlm.processes.causal import Causal


class Autoregressive(Family):
    name = "ar"
    causal = True
    is_bound = False
    label = "autoregressive"
    default_objective = "ce"

    @classmethod
    def check_config(cls, cfg):
        if cfg.time_conditioning:
            raise DlmError("the autoregressive family has no diffusion time to condition on: "
                           "drop time_conditioning=true (it is for mdlm and usdm)")

    def network_steps(self, settings, length):
        return length  # one token per step; ``steps`` does not apply

    def _shift(self, x0):
        """[BOS, x0_1 … x0_{L−1}]: the block's first token is predicted from BOS alone, so
        the model scores all L tokens of a block, like the diffusion bound does."""
        bos = torch.full_like(x0[:, :1], self.eos_id)
        return torch.cat([bos, x0[:, :-1]], dim=1)

    def _score(self, model, batch):
        where = batch.target  # clean context is conditioned on, not scored
        pad = batch.attention_pad
        if pad is not None:  # the input at position l is x0[l − 1] (BOS at 0, never padding)
            pad = torch.cat([torch.zeros_like(pad[:, :1]), pad[:, :-1]], dim=1)
        c = Corrupted(batch.x0, batch.x0, torch.zeros(batch.x0.shape[0], device=batch.x0.device), where)
        return self.score(self.objective, model, c, where, Causal(self.eos_id), x=self._shift(batch.x0), pad=pad)

    def loss(self, model, batch, generator, rows=slice(None)):
        return self._score(model, batch.rows(rows))

    def nll(self, model, batch, generator, mc_samples):
        return self._score(model, batch).nats.double()

    def sample(self, model, given, clean, generator, settings=None):
        return self.sampler(settings).sample(model, Causal(self.eos_id), given, clean, generator)
