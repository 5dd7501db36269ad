"""Masked (absorbing-state) diffusion, as in MDLM (Sahoo et al. 2024, arXiv 2406.07524).

Forward marginal, per token independently:

    q(x_t | x0) = α_t · δ(x_t = x0) + (1 − α_t) · δ(x_t = m),

where m = ``mask_id`` = ``vocab_size`` is an extra input token that the network embeds but
never predicts. Reverse posterior for s < t, for a position that is masked at time t:

    q(x_s = x0 | x_t = m, x0) = (α_s − α_t) / (1 − α_t),
    q(x_s = m  | x_t = m, x0) = (1 − α_s) / (1 − α_t);

an unmasked position stays as it is (the "carry-over" of the SUBS parameterisation).
"""

from __future__ import annotations

import torch

from dlm.batch import keep_fixed
from dlm.processes.base import Process


class MaskedProcess(Process):
    def predicted(self, xt):
        return xt == self.mask_id  # an unmasked position is carried over: no loss, no logits

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    @property
    def input_vocab_size(self) -> int:
        return self.vocab_size + 1

    def corrupt(self, x0, t, generator, fixed=None):
        alpha_t = self.schedule.alpha(t)[:, None]  # (B, 1)
        u = torch.rand(x0.shape, generator=generator, device=x0.device)
        xt = torch.where(u < 1.0 - alpha_t, torch.full_like(x0, self.mask_id), x0)
        return keep_fixed(x0, xt, fixed)

    def corrupt_count(self, x0: torch.Tensor, k: torch.Tensor, generator: torch.Generator,
                      fixed: torch.Tensor | None = None) -> torch.Tensor:
        """Mask exactly k[b] of the free (not ``fixed``) positions of row b, chosen uniformly
        at random: x0 (B, L), k (B,) ≤ the number of free positions of each row."""
        u = torch.rand(x0.shape, generator=generator, device=x0.device)
        if fixed is not None:
            u = u.masked_fill(fixed, 2.0)  # fixed positions sort after every free one
        rank = u.argsort(dim=-1).argsort(dim=-1)  # a uniformly random permutation per row
        xt = torch.where(rank < k[:, None], torch.full_like(x0, self.mask_id), x0)
        return keep_fixed(x0, xt, fixed)

    def prior(self, shape, generator, device):
        return torch.full(shape, self.mask_id, dtype=torch.long, device=device)

    def prior_probs(self, dtype=torch.float64):
        return torch.nn.functional.one_hot(torch.tensor(self.mask_id), self.input_vocab_size).to(dtype)

    def unmask_probability(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """q(x_s ≠ m | x_t = m) = (α_s − α_t) / (1 − α_t); exactly 1 when s = 0."""
        alpha_t, alpha_s = self.schedule.alpha(t), self.schedule.alpha(s)
        return ((alpha_s - alpha_t) / (1.0 - alpha_t).clamp_min(1e-12)).clamp(0.0, 1.0)
