"""Open a trained run folder for evaluation or sampling."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dlm.checkpoint import load_checkpoint, load_weights, read_run_config
from dlm.config import RunConfig
from dlm.data import Tokenizer, load_tokenizer
from dlm.device import resolve_device
from dlm.errors import DlmError
from dlm.families import FAMILIES, Family


@dataclass
class LoadedRun:
    path: Path
    cfg: RunConfig
    tokenizer: Tokenizer
    family: Family
    model: torch.nn.Module
    step: int
    device: torch.device


def load_run(path: Path, device: str = "auto", use_ema: bool = True) -> LoadedRun:
    path = Path(path)
    cfg = read_run_config(path)
    tok_path = path / "tokenizer.json"
    if not tok_path.is_file():
        raise DlmError(f"{path} has no tokenizer.json")
    tokenizer = load_tokenizer(tok_path)
    if tokenizer.kind != cfg.data.tokenizer:
        raise DlmError(f"{tok_path} is a '{tokenizer.kind}' tokenizer but the run was trained with '{cfg.data.tokenizer}'")
    ckpt = load_checkpoint(path, with_trainer=False)
    family = FAMILIES.get(cfg.family)(cfg, tokenizer.vocab_size, tokenizer.eos_id)
    model = family.build_model()
    embed = ckpt.model.get("embed.weight")
    if embed is not None and embed.shape[0] != family.input_vocab_size:
        raise DlmError(
            f"tokenizer in {path} has {tokenizer.vocab_size} tokens but the checkpoint was trained "
            f"for {embed.shape[0] - (family.input_vocab_size - tokenizer.vocab_size)}: they do not belong together"
        )
    weights = ckpt.ema if (use_ema and ckpt.ema is not None) else ckpt.model
    load_weights(model, weights, path)
    dev = resolve_device(device)
    model.to(dev).eval()
    return LoadedRun(path, cfg, tokenizer, family, model, ckpt.step, dev)
