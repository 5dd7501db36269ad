"""Open a trained run folder for evaluation or sampling — or a folder ``dlm export`` wrote
(a Hugging Face model folder that also holds the run's config and tokenizer)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from dlm.backbones.pretrained import PREFIX, with_run_architecture
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


EXPORT_CONFIG, EXPORT_TOKENIZER = "dlm_config.yaml", "dlm_tokenizer.json"  # beside config.json in an export


def is_export_dir(path: Path) -> bool:
    """Whether ``path`` is a folder ``dlm export`` wrote (not a run folder)."""
    return not is_run_dir(path) and (path / EXPORT_CONFIG).is_file() and (path / "config.json").is_file()


def _load_export(path: Path, device: str) -> LoadedRun:
    """An exported folder as a run: its config, tokenizer and ``model.safetensors``."""
    import json

    from safetensors.torch import load_file

    from dlm.config import from_dict

    cfg = from_dict(load_yaml(path / EXPORT_CONFIG))
    tokenizer = load_tokenizer(path / EXPORT_TOKENIZER)
    try:
        step = int(json.loads((path / "config.json").read_text(encoding="utf-8"))["dlm"]["step"])
        weights = load_file(path / "model.safetensors")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DlmError(f"{path} is not a readable dlm export ({type(e).__name__}: {str(e)[:100]})") from None
    build = with_run_architecture(cfg, path)  # an adapted pretrained model: its architecture in OUT/pretrained
    native = bool(cfg.model.pretrained) and build is cfg  # a causal one: OUT is the architecture's own folder
    if native:
        build = copy.deepcopy(cfg)
        build.model.pretrained = PREFIX + str(path)
    family = FAMILIES.get(cfg.family)(build, tokenizer.vocab_size, tokenizer.eos_id)
    model = family.build_model()
    if not native:  # (a native folder's weights came with the architecture)
        load_weights(model, weights, path)
    dev = resolve_device(device)
    model.to(dev).eval()
    return LoadedRun(path, cfg, tokenizer, family, model, step, dev)


def load_run(path: Path, device: str = "auto", use_ema: bool = True) -> LoadedRun:
    path = Path(path)
    if is_export_dir(path):
        return _load_export(path, device)
    check_family(path)
    cfg = read_run_config(path)
    tok_path = path / "tokenizer.json"
    if not tok_path.is_file():
        raise DlmError(f"{path} has no tokenizer.json")
    tokenizer = load_tokenizer(tok_path)
    if tokenizer.kind != cfg.data.tokenizer:
        raise DlmError(f"{tok_path} is a '{tokenizer.kind}' tokenizer but the run was trained with '{cfg.data.tokenizer}'")
    family = FAMILIES.get(cfg.family)(with_run_architecture(cfg, path), tokenizer.vocab_size, tokenizer.eos_id)
    model = family.build_model()  # before the checkpoint is read (a pretrained one too large: one line)
    ckpt = load_checkpoint(path, with_trainer=False)
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
