"""torchrun, DDP and FSDP2 at the edge of the program.

Nothing below ``train.py`` imports ``torch.distributed``: processes, objectives, samplers
and backbones stay single-process code. Launch several processes with torchrun::

    torchrun --standalone --nproc_per_node=8 -m dlm train --config ... --out RUN
    torchrun --standalone --nproc_per_node=8 -m dlm train --parallel fsdp ...

Each rank trains on its own slice of every global batch (``train.batch_size`` per rank);
rank 0 alone writes the run folder. NCCL on CUDA, Gloo on CPU (DDP and FSDP2 both).

How the ranks share the model is one strategy object, chosen by ``train.parallel``:

- ``ddp`` (:class:`Dist`): every rank holds the whole model and optimiser; DDP averages
  the gradients over ranks once per optimiser step.
- ``fsdp`` (:class:`FullyShardedDist`): FSDP2 (``fully_shard``) shards each transformer
  block and the rest of the model over the ranks (parameters, gradients, optimiser state
  and the EMA are DTensors holding 1/world of each tensor); its reduce-scatter averages
  the gradients over ranks just as DDP does, so the loop's normalisation is the same.

The loop asks the strategy to wrap the model, to skip the gradient sync on all but the
last micro-batch, to gather full tensors for the single-file weights of a checkpoint, to
shard full tensors back (the EMA on resume) and to save and load the sharded optimiser
state with ``torch.distributed.checkpoint`` (which reshards onto any number of ranks).
A single process (world 1) is the plain model whatever ``train.parallel`` says.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import os
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(t, DTensor)


@dataclass
class Dist:
    """One rank of a run and the DDP strategy (world 1: a plain single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    name = "ddp"
    # the DDP modules :meth:`wrap` made, released by :meth:`shutdown` (weak: never kept alive)
    _wrapped: list = field(default_factory=list, repr=False, compare=False)

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

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a path, a flag)."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    # ---- the strategy: how the ranks share the model ------------------------------------

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the loop calls forward on (``model`` itself when there is one rank)."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if next(model.parameters()).is_cuda else None
        # gradients as views of the all-reduce buckets: no copy in and out of them each step;
        # no broadcast of the buffers before every forward (DDP's default): dlm's models hold
        # none that training changes (RoPE tables, computed alike on every rank: tested)
        # (torch ≥ 2.13 names it forward_sync_buffers and deprecates broadcast_buffers with a
        # warning on every rank; the new flag still syncs buffers once at init: harmless)
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        net = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True, **no_buffer_sync)
        self._wrapped.append(weakref.ref(net))
        return net

    def no_sync(self, net: torch.nn.Module):
        """Accumulate gradients locally: no all-reduce in the backward passes inside."""
        return net.no_sync() if self.enabled else contextlib.nullcontext()

    def full_state(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Whole CPU tensors of a state dict on rank 0 (None elsewhere); collective under FSDP.

        Sharded tensors are gathered one at a time, so no rank ever holds the whole model twice.
        """
        out: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            value = value.detach()
            if _is_dtensor(value):
                value = value.full_tensor()  # every rank takes part
            if self.is_main:
                out[key] = value.contiguous().cpu()
        return out if self.is_main else None

    def shard_like(self, full: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole tensors (the same on every rank) laid out as ``like``'s: sharded where it is."""
        from_full = {}
        for key, ref in like.items():
            value = full[key].to(device=ref.device, dtype=ref.dtype)
            if _is_dtensor(ref):
                from torch.distributed.tensor import distribute_tensor

                # every rank read the same file: each keeps its own shard, nothing is sent
                value = distribute_tensor(value, ref.device_mesh, ref.placements, src_data_rank=None)
            from_full[key] = value
        return from_full

    def optimizer_state(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimiser state keyed by parameter name; sharded tensors under FSDP."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt)

    def save_sharded(self, state: dict[str, Any], folder: Path) -> None:
        """Every rank writes its shards of ``state`` (replicated tensors once) into ``folder``."""
        save_shards(state, folder)

    def load_optimizer_shards(self, model: torch.nn.Module, opt: torch.optim.Optimizer, folder: Path) -> None:
        """Restore the optimiser state :meth:`save_sharded` wrote, on any number of ranks.

        DCP reads into the layout of this run's optimiser, whatever the world size that
        wrote it: each rank reads the pieces of each saved tensor its shard covers.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        state = {"optimizer": self.optimizer_state(model, opt)}  # (initialises the optimiser's state)
        with warnings.catch_warnings():  # one process reading what several wrote is meant
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(state, checkpoint_id=str(folder))
        set_optimizer_state_dict(model, opt, state["optimizer"])

    def load_full_optimizer_state(self, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Restore an ``opt.state_dict()`` of a single-process run (parameters numbered in
        the optimiser's order) onto this run, sharding it where the model is sharded."""
        if not self.enabled:
            opt.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for group in opt.param_groups for p in group["params"]]
        if len(order) != sum(len(g["params"]) for g in state["param_groups"]):
            raise ValueError("the saved optimiser has a different number of parameters")
        by_name = {
            "state": {order[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]],
        }
        set_optimizer_state_dict(model, opt, by_name, options=StateDictOptions(full_state_dict=True))

    def _device(self) -> torch.device:
        if torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def shutdown(self) -> None:
        """Leave the process group, after releasing what the DDP modules hold of it.

        A DDP module's reducer (and the logger that shares it) keeps the Gloo process group
        alive; were it the group's last holder, the group's destructor would run when the
        module is freed, with the GIL held, and wait on a Gloo worker thread that needs the
        GIL to free its last work's tensors: the process hangs at exit (seen in 1 of 16
        two-rank runs here, torch 2.13; none in 100 since). Freed here, while the world
        still holds the group, the reducers only let go of it; ``destroy_process_group``
        then frees the group from Python, which releases the GIL for its destructor.
        """
        if not (self.enabled and torch.distributed.is_initialized()):
            return
        for ref in self._wrapped:
            net = ref()
            if net is not None:  # after shutdown the module is not used for DDP again
                for name in ("logger", "reducer"):
                    net.__dict__.pop(name, None)
        self._wrapped.clear()
        gc.collect()  # DDP modules only reference cycles still hold
        torch.distributed.destroy_process_group()


@dataclass
class FullyShardedDist(Dist):
    """FSDP2: parameters, gradients, optimiser state and EMA sharded over the ranks."""

    name = "fsdp"

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Shard each transformer block, then the rest (embedding, head): one all-gather per
        block in the forward, freed after it. ``model`` becomes the sharded module in place.
        On CUDA under the mixed-precision policy of :func:`mixed_precision`."""
        if not self.enabled:
            return model
        fully_shard, _ = fsdp2()
        policy = mixed_precision(next(model.parameters()).device)
        for block in getattr(model, "blocks", ()):
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model

    @contextlib.contextmanager
    def no_sync(self, net: torch.nn.Module):
        """FSDP2's switch: gradients stay unsharded and local until the last micro-batch."""
        if not self.enabled:
            yield
            return
        net.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            net.set_requires_gradient_sync(True)


PARALLEL: dict[str, type[Dist]] = {"ddp": Dist, "fsdp": FullyShardedDist}


def fsdp2():
    """(fully_shard, MixedPrecisionPolicy): torch.distributed.fsdp from torch 2.6, its
    ``_composable`` home in 2.5."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def mixed_precision(device: torch.device):
    """FSDP2's policy: on CUDA the all-gathered parameters in bf16 (what autocast would cast
    them to: one bf16 all-gather instead of an fp32 one, and no cast in every matmul) and the
    gradients reduce-scattered in float32 (the sharded parameters, the optimiser and the EMA
    stay float32); elsewhere (Gloo on a CPU) float32 throughout, as without a policy."""
    _, policy = fsdp2()
    if device.type != "cuda":
        return policy()
    return policy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def save_shards(state: dict[str, Any], folder: Path) -> None:
    """``torch.distributed.checkpoint.save`` of ``state`` into ``folder``, with no per-save
    identity in its ``.metadata``: DCP records a random ``save_id`` and the folder's path (a
    temporary name, here), so the same state would give files of different bytes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Writer(dcp.FileSystemWriter):
        def storage_meta(self) -> StorageMeta:
            return StorageMeta()

    dcp.save(state, storage_writer=Writer(str(folder)))


def init_distributed(device: torch.device, parallel: str = "ddp") -> Dist:
    """Join the process group torchrun describes in the environment; a plain run is rank 0 of 1.

    ``parallel`` (``train.parallel``) picks the strategy: ``ddp`` or ``fsdp``.
    """
    strategy = PARALLEL[parallel]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return strategy()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return strategy(rank=rank, world=world, local_rank=local_rank)
