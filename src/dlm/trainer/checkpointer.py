"""The run's checkpoints from the loop's side. :func:`open_for_resume` reads the newest one
and loads its weights before the model is compiled and wrapped; a :class:`Checkpointer`
restores the rest (optimiser, EMA, data position, random generators, counters) once they
exist, and writes checkpoints — one process, or every rank's share under DDP / FSDP2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dlm.checkpoint import (SHARDS, Checkpoint, begin_checkpoint, checkpoint_shards, commit_checkpoint,
                            load_checkpoint, load_weights, remove_partial_checkpoints, run_data_identity,
                            save_checkpoint)
from dlm.config import RunConfig
from dlm.data import BlockLoader, TokenData
from dlm.data.corpora import check_data_identity
from dlm.distributed import Dist
from dlm.errors import DlmError
from dlm.trainer.ema import EMA
from dlm.trainer.state import TrainState


def open_for_resume(out: Path, cfg: RunConfig, data: TokenData, dist: Dist,
                    model: torch.nn.Module) -> tuple[Checkpoint, Path | None]:
    """The newest checkpoint of run ``out`` and its optimiser shards' folder (a run on several
    processes); its whole weights loaded into ``model``, before the strategy shards them."""
    if dist.is_main:
        remove_partial_checkpoints(out)  # a SIGKILLed writer's leftovers
    check_data_identity(run_data_identity(out), data.identity, cfg.data.data)
    ckpt = load_checkpoint(out)
    shards = checkpoint_shards(out)  # the optimiser state of a run on several processes
    load_weights(model, ckpt.model, out)
    return ckpt, shards


def pad_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Moments of fewer rows than their parameter (an output layer padded since the run began:
    ``TransformerConfig.vocab_multiple``) padded with zeros, like the layer's padded rows."""
    for group in opt.param_groups:
        for p in group["params"]:
            for key, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v) and v.dim() and v.shape[1:] == p.shape[1:] and v.shape[0] < p.shape[0]:
                    opt.state[p][key] = torch.cat([v, v.new_zeros((p.shape[0] - v.shape[0], *v.shape[1:]))])


class Checkpointer:
    """Writes and restores everything but the weights' initial load: ``trainer.pt`` holds
    the optimiser (one process), the data position, the random generators and the
    :class:`TrainState` counters."""

    def __init__(self, out: Path, dist: Dist, model: torch.nn.Module, opt: torch.optim.Optimizer, ema: EMA | None,
                 loader: BlockLoader, device: torch.device, keep: int):
        self.out, self.dist, self.model, self.opt, self.ema = out, dist, model, opt, ema
        self.loader, self.device, self.keep = loader, device, keep
        self.saved: int | None = None  # the step of the newest checkpoint in the folder

    def trainer_state(self, state: TrainState) -> dict[str, Any]:
        """The contents of ``trainer.pt``."""
        return {
            # several processes: the optimiser state goes, sharded, into the checkpoint's dcp/ folder
            "optimizer": None if self.dist.enabled else self.opt.state_dict(),
            "loader": self.loader.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            **state.state_dict(),
        }

    def save(self, state: TrainState) -> None:
        """Checkpoint ``state.step``, atomically (every rank calls this)."""
        step, dist = state.step, self.dist
        self.saved = step
        if not dist.enabled:
            save_checkpoint(self.out, step, self.model, self.ema.shadow if self.ema else None,
                            self.trainer_state(state), self.keep)
            return
        # several processes: whole weights and EMA gathered to rank 0 (one safetensors file
        # each, loadable by one process); the optimiser state written by every rank, sharded
        weights = dist.full_state(self.model.state_dict())
        ema_weights = dist.full_state(self.ema.shadow) if self.ema else None
        tmp = dist.broadcast_object(begin_checkpoint(self.out, step) if dist.is_main else None)
        if tmp is not None:
            dist.save_sharded({"optimizer": dist.optimizer_state(self.model, self.opt)}, tmp / SHARDS)
        dist.barrier()
        if dist.is_main:
            commit_checkpoint(self.out, step, tmp, weights, ema_weights, self.trainer_state(state), self.keep)
        dist.barrier()

    def restore(self, ckpt: Checkpoint, shards: Path | None, state: TrainState) -> None:
        """The EMA, optimiser, data position, generators and counters of ``ckpt``, whatever
        number of processes wrote it: DCP reshards the sharded state, a single process's
        whole state is split here."""
        if self.ema is not None and ckpt.ema is not None:
            self.ema.shadow = self.dist.shard_like(ckpt.ema, self.ema.shadow)
        st = ckpt.trainer
        try:
            if st.get("optimizer") is not None:
                self.dist.load_full_optimizer_state(self.model, self.opt, st["optimizer"])
            elif shards is not None:
                self.dist.load_optimizer_shards(self.model, self.opt, shards)
            else:
                raise KeyError("optimizer")
            pad_optimizer_state(self.opt)
            self.loader.load_state_dict(st["loader"])
            torch.set_rng_state(st["torch_rng"])
            if self.device.type == "cuda" and st.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(st["cuda_rng"], self.device)
        except (KeyError, ValueError, RuntimeError) as e:
            raise DlmError(f"checkpoint in {self.out} does not fit this run: {e}") from None
        state.load_state_dict(st, ckpt.step)
        self.saved = ckpt.step
