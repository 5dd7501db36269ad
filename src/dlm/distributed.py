"""torchrun / DDP at the edge of the program.

Nothing below ``train.py`` imports ``torch.distributed``: processes, objectives, samplers
and backbones stay single-process code. Launch several processes with torchrun::

    torchrun --standalone --nproc_per_node=8 -m dlm train --config ... --out RUN

Each rank trains on its own slice of every global batch (``train.batch_size`` per rank);
gradients are averaged by DDP; rank 0 alone writes the run folder. NCCL on CUDA, Gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_reduce(self, values: list[float], op: str = "mean") -> list[float]:
        """Reduce a few floats across ranks (loss for logging, stop flags)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        if op == "max":
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        else:
            torch.distributed.all_reduce(t)
            t /= self.world
        return t.tolist()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Σ of a tensor over ranks (no host synchronisation)."""
        if self.enabled:
            t = t.to(self._device())
            torch.distributed.all_reduce(t)
        return t

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if next(model.parameters()).is_cuda else None
        return DistributedDataParallel(model, device_ids=ids)

    def _device(self) -> torch.device:
        if torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def shutdown(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_distributed(device: torch.device) -> Dist:
    """Join the process group torchrun describes in the environment; a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank)
