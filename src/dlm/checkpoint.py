"""Run folders and atomic checkpoints.

A run folder::

    RUN/dlm-run.json          marks a dlm run: format version, family, dlm version
    RUN/config.yaml           the resolved RunConfig
    RUN/tokenizer.json        the tokenizer, self-contained
    RUN/metrics.jsonl         one JSON object per logged step
    RUN/checkpoints/step_00000500/{model,ema}.safetensors, trainer.pt, meta.json
    RUN/checkpoints/latest    name of the newest complete checkpoint

A checkpoint is written into a temporary folder, flushed, renamed into place, and only then
named in ``latest`` (itself replaced atomically). A crash at any moment leaves the previous
checkpoint intact and ``latest`` pointing at a complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dlm import __version__
from dlm.config import RunConfig, from_dict, load_yaml, save_yaml
from dlm.errors import DlmError

RUN_FORMAT = "dlm-run/1"
MARKER = "dlm-run.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_run_dir(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def create_run_dir(path: Path, cfg: RunConfig, tokenizer) -> None:
    """Write the run's config and tokenizer; refuses a folder that already holds anything."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if is_run_dir(path):
            raise DlmError(f"{path} already holds a run: pass --resume to continue it, or choose another --out")
        raise DlmError(f"{path} exists and is not empty: choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / "config.yaml", save_yaml(cfg))
    tokenizer.save(path / "tokenizer.json")
    marker = {"format": RUN_FORMAT, "family": cfg.family, "dlm_version": __version__}
    atomic_write_text(path / MARKER, json.dumps(marker, indent=1))  # last: the run now exists


def read_run_config(path: Path) -> RunConfig:
    path = Path(path)
    if not path.is_dir():
        raise DlmError(f"run folder {path} does not exist")
    if not is_run_dir(path):
        raise DlmError(f"{path} is not a dlm run folder (no {MARKER})")
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        raise DlmError(f"{path / MARKER} is corrupt") from None
    if marker.get("format") != RUN_FORMAT:
        raise DlmError(f"{path} was written in format {marker.get('format')!r}; this dlm reads {RUN_FORMAT}")
    return from_dict(load_yaml(path / "config.yaml"))


@dataclass
class Checkpoint:
    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    trainer: dict[str, Any] | None  # optimiser, data position, random states


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    ema: dict[str, torch.Tensor] | None,
    trainer: dict[str, Any],
    keep: int = 2,
) -> Path:
    ckpts = Path(run_dir) / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = ckpts / name
    if not final.exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=ckpts))
        try:
            state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            save_file(state, tmp / "model.safetensors", metadata={"format": RUN_FORMAT, "step": str(step)})
            if ema is not None:
                save_file({k: v.contiguous().cpu() for k, v in ema.items()}, tmp / "ema.safetensors")
            torch.save(trainer, tmp / "trainer.pt")
            (tmp / "meta.json").write_text(json.dumps({"format": RUN_FORMAT, "step": step}))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            os.rename(tmp, final)
            _fsync_dir(ckpts)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    atomic_write_text(ckpts / "latest", name + "\n")
    # prune: keep the newest `keep` complete checkpoints (and any in-progress temp folders of others)
    done = sorted(p for p in ckpts.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in done[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Delete temporary folders a killed process left behind (never a complete checkpoint)."""
    ckpts = Path(run_dir) / "checkpoints"
    if ckpts.is_dir():
        for tmp in ckpts.glob(".tmp-step_*"):
            shutil.rmtree(tmp, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path:
    ckpts = Path(run_dir) / "checkpoints"
    try:
        name = (ckpts / "latest").read_text().strip()
    except OSError:
        raise DlmError(f"{run_dir} has no checkpoint yet") from None
    path = ckpts / name
    if not (path / "meta.json").is_file():
        raise DlmError(f"checkpoint {path} named in 'latest' is missing or incomplete")
    return path


def load_checkpoint(run_dir: Path, with_trainer: bool = True) -> Checkpoint:
    path = latest_checkpoint(run_dir)
    try:
        meta = json.loads((path / "meta.json").read_text())
        step = int(meta["step"])
    except (OSError, ValueError, KeyError):
        raise DlmError(f"checkpoint {path} is corrupt (meta.json unreadable)") from None
    if meta.get("format") != RUN_FORMAT:
        raise DlmError(f"checkpoint {path} has format {meta.get('format')!r}, expected {RUN_FORMAT}")

    def tensors(name: str) -> dict[str, torch.Tensor]:
        try:
            return load_file(path / name)
        except (SafetensorError, OSError, ValueError) as e:
            raise DlmError(f"checkpoint file {path / name} is corrupt: {e}") from None

    model = tensors("model.safetensors")
    ema = tensors("ema.safetensors") if (path / "ema.safetensors").exists() else None
    trainer = None
    if with_trainer:
        try:
            trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # pickle/zip errors of many types all mean "corrupt"
            raise DlmError(f"checkpoint file {path / 'trainer.pt'} is corrupt: {type(e).__name__}") from None
    return Checkpoint(step, model, ema, trainer)


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Load a state dict, turning shape or key mismatches into one clear line."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise DlmError(
            f"checkpoint {source} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for key, tensor in weights.items():
        if own[key].shape != tensor.shape:
            raise DlmError(
                f"checkpoint {source} does not fit this model: {key} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(own[key].shape)} (a different tokenizer or size?)"
            )
    model.load_state_dict(weights)
