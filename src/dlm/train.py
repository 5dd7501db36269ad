"""Training: :func:`train`, the entry that ``dlm train``, ``dlm bench compare`` and library
users call. It checks the config, picks the device, joins torchrun's processes, checks the
compiler and locks the run folder; the loop itself is :class:`dlm.trainer.Trainer`
(set-up, one step, checkpoints, logging, throughput and stopping each in a module of
``dlm.trainer``). The loop never asks which process or objective is in use: the family
turns a batch into a loss, the loop does the rest (accumulation, clipping, AdamW with
warm-up + cosine decay, EMA, logging, atomic checkpoints, exact resume, clean stops)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from dlm.config import RunConfig
from dlm.data import TokenData
from dlm.device import resolve_device
from dlm.distill.trainer import DistillTrainer
from dlm.distributed import init_distributed
from dlm.runlock import run_lock
# the loop's pieces, importable from here as before they moved into dlm.trainer
from dlm.trainer.compiling import check_compile, compile_blocks, with_compile_resolved
from dlm.trainer.ema import EMA
from dlm.trainer.loop import Trainer, TrainResult
from dlm.trainer.metrics_log import MetricsLog
from dlm.trainer.setup import load_init_weights
from dlm.trainer.step import accumulate_gradients, lr_at, step_seed

__all__ = ["EMA", "MetricsLog", "TrainResult", "Trainer", "accumulate_gradients", "check_compile", "check_config",
           "compile_blocks", "load_init_weights", "lr_at", "step_seed", "train"]


def check_config(cfg: RunConfig) -> None:
    """Every setting in range and the family's components resolved (raises DlmError)."""
    from dlm.config import finalize

    finalize(cfg)


def train(
    cfg: RunConfig,
    out: Path,
    resume: bool = False,
    progress: bool = True,
    data: TokenData | None = None,
) -> TrainResult:
    """Train ``cfg`` into run folder ``out`` (or continue the run there with ``resume``).

    Under torchrun every rank calls this; rank 0 alone writes the run folder.
    """
    check_config(cfg)
    device = resolve_device(cfg.train.device)
    dist = init_distributed(device, cfg.train.parallel)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    cfg = with_compile_resolved(cfg, device)
    try:
        probe_s = check_compile(device) if cfg.train.compile else 0.0  # before any work
        # one writer per run folder: a second `--resume` of a run in use stops with one line
        with run_lock(Path(out)) if dist.is_main else contextlib.nullcontext():
            # a student of ``dlm distill`` trains (and resumes) with its teacher beside it
            loop = DistillTrainer if cfg.distill.teacher is not None else Trainer
            return loop(cfg, Path(out), resume, progress and dist.is_main, data, device, dist, probe_s).train()
    finally:
        dist.shutdown()
