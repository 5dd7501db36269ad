"""Device choice and mixed precision: bf16 autocast on CUDA, full precision elsewhere."""

from __future__ import annotations

import contextlib

import torch

from dlm.errors import DlmError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DlmError(f"unknown device '{name}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DlmError(f"device '{name}' asked for, but this torch sees no CUDA GPU")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DlmError("device 'mps' asked for, but it is not available")
    if device.type == "cuda":
        allow_tf32()
    return device


def allow_tf32() -> None:
    """float32 matmuls and convolutions on CUDA in TF32 (what is left outside bf16 autocast)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def to_host(t: torch.Tensor) -> list:
    """The values of a small tensor on the host, as a (nested) list: on a GPU one host
    synchronisation (one copy) however many values it holds — what a sampler reads once per
    step instead of an ``.item()`` per value."""
    return t.to("cpu", copy=True).tolist()


def true_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """(count,) flat row-major indices of the true entries of ``mask``, which holds exactly
    ``count`` of them (known on the host): ``mask.flatten().nonzero()[:, 0]`` without the
    host synchronisation ``nonzero`` makes on a GPU (the output's size is given)."""
    flat = mask.reshape(-1)
    slot = torch.where(flat, flat.cumsum(0) - 1, count)  # a true entry's rank; the rest to a spare slot
    out = torch.empty(count + 1, dtype=torch.long, device=mask.device)
    out.scatter_(0, slot, torch.arange(flat.numel(), device=mask.device))
    return out[:count]
