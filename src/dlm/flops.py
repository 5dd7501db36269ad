"""Model FLOPs utilisation: the fraction of the device's peak that a step's model FLOPs use.

Model FLOPs per trained token (PaLM, Chowdhery et al. 2022, App. B): 6·N for the weight
matmuls of the forward and backward passes (N = parameters outside the embedding table,
whose lookup is no matmul) plus 12·n_layer·d_model·L for attention's scores and values at
sequence length L. The work actually done: the output layer (H of the N parameters) counts
only at the positions it ran on — every one with static shapes, the scored ones when the
family gathers them (MDLM's masked positions: about half), ``head_share`` of the tokens —
so a training step's model FLOPs per token are 6·(N − H) + 6·H·head_share + 12·n_layer·d_model·L. The peak is the device's dense bf16 tensor throughput: looked up from
the CUDA device name, or given as ``train.peak_tflops``; with neither (a CPU) MFU is not
reported.
"""

from __future__ import annotations

import torch

# dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets, without sparsity)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                    "4090": 165.0, "3090": 71.0, "V100": 125.0}


def peak_tflops(device: torch.device, given: float = 0.0) -> float | None:
    """The device's bf16 peak in TFLOP/s: ``given`` when > 0, else looked up; None if unknown."""
    if given > 0:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def head_params(model: torch.nn.Module) -> int:
    """H: the output layer's parameters (its padded rows included: they take part in the matmul)."""
    head = getattr(model, "head", None)
    return sum(p.numel() for p in head.parameters()) if isinstance(head, torch.nn.Linear) else 0


def flops_per_token(model: torch.nn.Module, seq_len: int, head_share: float = 1.0) -> float:
    """6·(N − H) + 6·H·head_share + 12·n_layer·d_model·seq_len model FLOPs per trained token
    (N without the embedding, H the output layer's, run at ``head_share`` of the tokens)."""
    cfg = model.cfg
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embed."))
    h = head_params(model)
    return 6.0 * (n - h) + 6.0 * h * head_share + 12.0 * cfg.n_layer * cfg.d_model * seq_len


def mfu(tokens_per_s: float, per_token: float, peak: float | None) -> float | None:
    """Achieved model FLOP/s over the peak, or None when the peak is unknown."""
    return None if not peak else tokens_per_s * per_token / (peak * 1e12)
