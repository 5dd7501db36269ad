"""Left-to-right sampling of the causal baseline with a KV cache: one network call per token."""

from __future__ import annotations

import torch

from dlm.backbones import KVCache
from dlm.samplers.base import SamplingOptions, filter_logits, sample_categorical


class AutoregressiveSampler:
    name = "autoregressive"

    def __init__(self, options: SamplingOptions):
        self.options = options

    @torch.no_grad()
    def sample(self, model, bos_id: int, num: int, length: int, prompt, generator):
        """Returns (num, length) tokens (the prompt included) and the number of network calls."""
        device = next(model.parameters()).device
        prefix = torch.full((num, 1), bos_id, dtype=torch.long, device=device)
        if prompt is not None and len(prompt):
            prefix = torch.cat([prefix, prompt.to(device)[None].expand(num, -1)], dim=1)
        out = prefix[:, 1:]
        cache = KVCache(model.cfg.n_layer)
        logits = model(prefix, cache=cache)[:, -1]  # prefill: (B, V)
        nfe = 1
        while out.shape[1] < length:
            nxt = sample_categorical(filter_logits(logits, self.options), generator)[:, None]  # (B, 1)
            out = torch.cat([out, nxt], dim=1)
            if out.shape[1] < length:
                logits = model(nxt, cache=cache)[:, -1]
                nfe += 1
        return out, nfe
