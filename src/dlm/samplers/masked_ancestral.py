"""Ancestral sampling of masked diffusion (MDLM), with the p(x0) cache.

From x_1 = all [MASK], for steps t = 1 → 0 on a uniform grid of T steps, each masked
position independently

  * unmasks with probability (α_s − α_t)/(1 − α_t), taking a token drawn from
    p_θ(x0 | x_t) (after temperature / top-k / top-p), or
  * stays masked.

Unmasked positions (and the prompt prefix) never change. At the last step s = 0, α_s = 1,
so every remaining mask unmasks: the output holds no [MASK].

The cache (MDLM's ``ddpm_cache``): a model without time conditioning gives the same
p_θ(x0 | x_t) for the same x_t, so when a step unmasks nothing the network is not called
again. With many steps most steps change nothing, and the number of network calls (NFE)
is bounded by the sequence length.
"""

from __future__ import annotations

import torch

from dlm.processes.masked import MaskedProcess
from dlm.samplers.base import SamplingOptions, filter_logits, sample_categorical


class MaskedAncestralSampler:
    name = "ancestral"

    def __init__(self, steps: int, options: SamplingOptions, use_cache: bool = True):
        if steps < 1:
            raise ValueError(f"`steps` must be > 0, got {steps}")
        self.steps, self.options, self.use_cache = steps, options, use_cache

    @torch.no_grad()
    def sample(self, model, process: MaskedProcess, num: int, length: int, prompt, generator, time_conditioned: bool):
        device = next(model.parameters()).device
        x = process.prior((num, length), generator, device)  # (B, L) all mask
        n_prompt = 0 if prompt is None else len(prompt)
        if n_prompt:
            x[:, :n_prompt] = prompt.to(device)
        times = torch.linspace(1.0, 0.0, self.steps + 1, device=device, dtype=torch.float64)
        cache_ok = self.use_cache and not time_conditioned
        logits, nfe = None, 0  # logits: (N, V) at the N masked positions of x
        for i in range(self.steps):
            t, s = times[i], times[i + 1]
            masked = x == process.mask_id
            if not masked.any():
                break
            if logits is None or not cache_ok:
                t_batch = torch.full((num,), float(t), device=device) if time_conditioned else None
                logits = model(x, t_batch, positions=masked)
                nfe += 1
            p_unmask = 1.0 if i == self.steps - 1 else float(process.unmask_probability(t, s))
            u = torch.rand(x.shape, generator=generator, device=device, dtype=torch.float64)
            unmask = masked & (u < p_unmask)
            if unmask.any():
                rows = logits[unmask[masked]]  # (n, V): the masked positions that unmask now
                x = x.clone()
                x[unmask] = sample_categorical(filter_logits(rows, self.options), generator)
                logits = None  # x changed: p(x0 | x_t) must be computed again
        return x, nfe
