"""Pieces every sampler shares: temperature / top-k / top-p filtering and float64 Gumbel-max."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm.errors import DlmError


@dataclass
class SamplingOptions:
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    def check(self) -> None:
        if self.temperature < 0:
            raise DlmError(f"temperature must be ≥ 0, got {self.temperature}")
        if self.top_k < 0:
            raise DlmError(f"top_k must be ≥ 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise DlmError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: torch.Tensor, opts: SamplingOptions) -> torch.Tensor:
    """float64 logits (…, V) after temperature, top-k and nucleus (top-p) filtering.

    Temperature 0 means greedy: every token but the argmax gets −inf.
    """
    logits = logits.double()
    if opts.temperature == 0:
        keep = logits == logits.max(dim=-1, keepdim=True).values
        return logits.masked_fill(~keep, float("-inf"))
    logits = logits / opts.temperature
    if opts.top_k and opts.top_k < logits.shape[-1]:
        kth = torch.topk(logits, opts.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the mass before it already reaches top_p (the top token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= opts.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_categorical(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """argmax(logits + Gumbel) in float64: (…, V) → (…,).

    float32 Gumbel noise truncates the tail of the distribution (rare tokens are never
    drawn), which lowers sample entropy; see Zheng et al. 2024 (arXiv 2409.02908).
    """
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (logits.double() + gumbel).argmax(dim=-1)
