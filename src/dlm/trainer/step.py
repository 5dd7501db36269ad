"""The maths of one optimiser step: the seed of its noise, its learning rate, its gradients."""

from __future__ import annotations

import contextlib
import hashlib
import math

import torch

from dlm.config import RunConfig
from dlm.device import autocast
from dlm.distributed import Dist
from dlm.families import Family


def step_seed(seed: int, step: int) -> int:
    """The seed of the noise (times, masks) of one optimiser step.

    Deriving it from (seed, step) instead of carrying a generator along makes a resumed run
    draw exactly the noise the uninterrupted run drew. Every rank draws the noise of the
    whole global batch from it and keeps its own rows, so the noise (and so the run) does not
    depend on the number of processes. (dlm-run/1 seeded with (seed, rank, step); rank 0's
    seeds are unchanged.)
    """
    return int(hashlib.sha1(f"{seed}/0/{step}".encode()).hexdigest()[:15], 16)


def annealed_attention(seed: int, step: int, anneal_steps: int, length: int) -> torch.Tensor | None:
    """DiffuLLaMA's attention-mask annealing at ``step`` (``train.attention_anneal_steps`` =
    ``anneal_steps``): a (length, length) bool mask, causal or-ed with a Bernoulli(step /
    anneal_steps) draw over all pairs, the same for every row and rank and drawn from (seed,
    step) alone, so a resumed run draws what the uninterrupted one drew; None (full
    attention) from ``anneal_steps`` on. Step 0 is causal. (DiffuLLaMA's ratio is (step + 1) /
    anneal_steps: its first step already sees some future keys.)"""
    if step >= anneal_steps:
        return None
    g = torch.Generator().manual_seed(int(hashlib.sha1(f"{seed}/attention/{step}".encode()).hexdigest()[:15], 16))
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return causal | (torch.rand(length, length, generator=g) < step / anneal_steps)


def lr_at(cfg: RunConfig, step: int, progress: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from lr to lr·min_lr_ratio."""
    t = cfg.train
    warm = min(1.0, (step + 1) / max(1, t.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return t.lr * warm * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine)


def accumulate_gradients(family: Family, net: torch.nn.Module, model: torch.nn.Module, batches, noise: torch.Generator,
                         dist: Dist, device: torch.device) -> torch.Tensor:
    """Gradients of one optimiser step over the global micro-batches ``batches``; returns its loss
    as a 0-dim float64 tensor (reading it is a host synchronisation: the loop does so only
    on the steps it logs or checkpoints).

    Each rank scores its rows of every micro-batch; the gradient is that of
    Σ nats / Σ scored tokens over the whole step — every micro-batch and every rank — so
    one process with batch 2b and two with batch b take the same step, and a sequence with
    few scored tokens weighs no more than its tokens do.
    """
    mine = slice(dist.rank, None, dist.world)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # Σ nats, Σ scored tokens
    batches = list(batches)
    for micro, batch in enumerate(batches):
        sync = micro == len(batches) - 1 or not dist.enabled  # DDP / FSDP2: reduce grads once per step
        with contextlib.nullcontext() if sync else dist.no_sync(net):
            with autocast(device):
                scored = family.loss(net, batch, noise, mine)
            scored.nats.sum().backward()  # each backward sums grads: normalised once below
        totals += torch.stack([scored.nats.detach().sum().double(), scored.count.sum().double()])
    # DDP's all-reduce and FSDP2's reduce-scatter averaged the gradients over ranks, hence world / count
    totals = dist.all_reduce_sum(totals)
    count = totals[1].clamp_min(1.0)
    scale = (dist.world / count).float()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads:  # one foreach call (a few fused kernels) instead of a kernel per tensor
        torch._foreach_mul_(grads, scale)
    return totals[0] / count
