"""What a run starts from: its data, its initial weights, its optimiser."""

from __future__ import annotations

from pathlib import Path

import torch

from dlm.checkpoint import load_checkpoint, load_weights
from dlm.config import RunConfig
from dlm.data import TokenData, load_tokenizer, prepare_data
from dlm.distributed import Dist


def prepare_run_data(cfg: RunConfig, out: Path, resume: bool, init_from: Path | None, dist: Dist) -> TokenData:
    """The run's tokens, with the tokenizer of the run it continues or fine-tunes, if any."""
    tokenizer = None
    if resume:
        tokenizer = load_tokenizer(out / "tokenizer.json")
    elif init_from is not None:
        tokenizer = load_tokenizer(init_from / "tokenizer.json")
    elif cfg.model.pretrained:  # a pretrained causal LM: its own tokenizer
        from dlm.backbones.pretrained import pretrained_folder
        from dlm.data.tokenizers import PretrainedTokenizer

        tokenizer = PretrainedTokenizer.from_folder(pretrained_folder(cfg.model.pretrained))
    if not dist.is_main:
        dist.barrier()  # rank 0 tokenises (and trains the BPE) once; the others read its cache
    data = prepare_data(cfg.data, tokenizer)
    if dist.is_main:
        dist.barrier()
    return data


def load_init_weights(model: torch.nn.Module, source: Path) -> None:
    """Fine-tuning starts from ``source``'s newest checkpoint: its EMA weights when it kept
    an EMA (what ``dlm eval`` and ``dlm sample`` of that run use), else its raw weights."""
    ckpt = load_checkpoint(source, with_trainer=False)
    load_weights(model, ckpt.ema if ckpt.ema is not None else ckpt.model, source)


def build_optimizer(model: torch.nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, weight decay on the matrices only (not on biases and norms)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.train.lr,
        betas=(cfg.train.beta1, cfg.train.beta2),
        fused=device.type == "cuda",
    )
