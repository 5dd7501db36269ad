"""Open a trained run folder for evaluation or sampling."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dlm.checkpoint import MARKER, is_run_dir, load_checkpoint, load_weights, read_run_config, run_family
from dlm.config import RunConfig, load_yaml
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


def check_family(path: Path) -> None:
    """``config.yaml`` names the family the run was trained as (``dlm-run.json`` records it).

    Checked before the config is read: a config edited to another family fails on that
    family's objective, sampler, tokenizer or weights, and the message would blame them.
    """
    config = path / "config.yaml"
    if not is_run_dir(path) or not config.is_file():
        return  # read_run_config says what is missing
    trained = run_family(path)
    written = load_yaml(config).get("family", RunConfig.family)
    if trained is not None and written != trained:
        raise DlmError(f"{config} says family '{written}' but the run was trained as a '{trained}' model "
                       f"({path / MARKER}): restore 'family: {trained}' in {config}")


def load_run(path: Path, device: str = "auto", use_ema: bool = True) -> LoadedRun:
    path = Path(path)
    check_family(path)
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
            f"the checkpoint in {path} takes {embed.shape[0]} input tokens but a '{cfg.family}' model over its "
            f"{tokenizer.vocab_size}-token tokenizer.json takes {family.input_vocab_size}: config.yaml, "
            f"tokenizer.json and the checkpoint do not belong together (a different family, tokenizer or model size?)"
        )
    weights = ckpt.ema if (use_ema and ckpt.ema is not None) else ckpt.model
    load_weights(model, weights, path)
    dev = resolve_device(device)
    model.to(dev).eval()
    return LoadedRun(path, cfg, tokenizer, family, model, ckpt.step, dev)
