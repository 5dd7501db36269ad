"""Device choice and mixed precision: bf16 autocast on CUDA, full precision elsewhere."""

from __future__ import annotations

import contextlib

import torch

from dlm.errors import DlmError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DlmError(f"unknown device '{name}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DlmError(f"device '{name}' asked for, but this torch sees no CUDA GPU")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DlmError("device 'mps' asked for, but it is not available")
    return device


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
