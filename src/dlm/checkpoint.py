"""Run folders and atomic checkpoints.

A run folder::

    RUN/dlm-run.json          marks a dlm run: format version, family, dlm version
    RUN/config.yaml           the resolved RunConfig
    RUN/tokenizer.json        the tokenizer, self-contained
    RUN/metrics.jsonl         one JSON object per logged step
    RUN/checkpoints/step_00000500/{model,ema}.safetensors, trainer.pt, clock.json, meta.json
    RUN/checkpoints/latest    name of the newest complete checkpoint
    RUN/checkpoints/step_…/dcp/  (runs on several processes) the optimiser state, sharded,
                              written with torch.distributed.checkpoint; trainer.pt then
                              holds the rest of the trainer state and no "optimizer"

A checkpoint is written into a temporary folder, flushed, renamed into place, and only then
named in ``latest`` (itself replaced atomically). A crash at any moment leaves the previous
checkpoint intact and ``latest`` pointing at a complete one.

The same state gives the same bytes: a run killed and resumed writes the files of a run never
stopped (the optimiser and the generators included). ``clock.json`` alone holds what the wall
clock measured (seconds trained, the steps left out of tokens/s), which no two runs share;
checkpoints written before it keep those counters in ``trainer.pt``, and load as before.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dlm import __version__
from dlm.config import RunConfig, from_dict, load_yaml, save_yaml
from dlm.errors import DlmError
# atomic_write_text is imported from here by callers too
from dlm.fsio import atomic_write_text, ensure_dir, fsync_dir, honour_umask, make_temp_dir, writing
from dlm.runlock import LOCK, run_lock

RUN_FORMAT = "dlm-run/2"
# Formats this dlm reads. dlm-run/1 (before per-component settings): its config.yaml has a
# root-level ``sddlm`` section, ``objective``/``sampler`` as names and a ``sample`` section;
# ``dlm.config.migrate`` rewrites it into the current layout on load. Checkpoints are unchanged.
READABLE_FORMATS = ("dlm-run/1", RUN_FORMAT)
MARKER = "dlm-run.json"
CHECKPOINT_NAME = re.compile(r"step_\d{8,}")  # what save_checkpoint names and `latest` may name
CLOCK = "clock.json"
CLOCK_KEYS = ("elapsed_s", "untimed_s", "untimed_tokens")  # the trainer state the wall clock decides


def is_run_dir(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def create_run_dir(path: Path, cfg: RunConfig, tokenizer, data_identity: str | None = None) -> None:
    """Write the run's config, tokenizer and marker into a new or empty folder ``path``.

    A run folder with no checkpoint (its run was killed before the first one) holds
    nothing worth keeping, and refusing it would leave the user in a loop (``--resume``:
    no checkpoint yet; ``train``: already holds a run), so it is started afresh. Under
    ``run_lock``, so a live run is never mistaken for such a one. ``data_identity``
    (:func:`dlm.data.corpora.data_identity`) goes into the marker for ``--resume`` to check.
    """
    path = Path(path)
    with run_lock(path):
        with writing(path, "read"):
            entries = [p for p in path.iterdir() if p.name != LOCK]
        if entries and is_run_dir(path) and not has_checkpoint(path):
            _clear_unstarted_run(path)
        elif entries and is_run_dir(path):
            raise DlmError(f"{path} already holds a run: pass --resume to continue it, or choose another --out")
        elif entries:
            raise DlmError(f"{path} exists and is not empty: choose another --out")
        try:
            atomic_write_text(path / "config.yaml", save_yaml(cfg))
            tokenizer.save(path / "tokenizer.json")
            marker = {"format": RUN_FORMAT, "family": cfg.family, "dlm_version": __version__}
            if data_identity is not None:
                marker["data_identity"] = data_identity
            atomic_write_text(path / MARKER, json.dumps(marker, indent=1))  # last: the run now exists
        except BaseException:  # a full disk, Ctrl-C: leave no half-made run behind
            for name in ("config.yaml", "tokenizer.json"):
                (path / name).unlink(missing_ok=True)
            raise


def _clear_unstarted_run(path: Path) -> None:
    """Remove what a run killed before its first checkpoint wrote beside its config."""
    with writing(path, "clear"):
        (path / "metrics.jsonl").unlink(missing_ok=True)
        for folder in ("checkpoints", "tensorboard"):
            if (path / folder).is_dir():
                shutil.rmtree(path / folder)


def _read_marker(path: Path) -> dict[str, Any]:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        raise DlmError(f"{path / MARKER} is corrupt") from None
    if not isinstance(marker, dict) or "format" not in marker:
        raise DlmError(f"{path / MARKER} is corrupt: expected a JSON object with a 'format' field")
    return marker


def run_family(path: Path) -> str | None:
    """The family the run in ``path`` was started as (its marker), or None if it saved none."""
    found = _read_marker(Path(path)).get("family")
    return found if isinstance(found, str) else None


def run_data_identity(path: Path) -> str | None:
    """The data identity saved when the run in ``path`` started; None for runs that saved none."""
    found = _read_marker(Path(path)).get("data_identity")
    return found if isinstance(found, str) else None


def read_run_config(path: Path) -> RunConfig:
    path = Path(path)
    if not path.is_dir():
        raise DlmError(f"run folder {path} does not exist")
    if not is_run_dir(path):
        raise DlmError(f"{path} is not a dlm run folder (no {MARKER})")
    marker = _read_marker(path)
    if not isinstance(marker, dict) or marker.get("format") not in READABLE_FORMATS:
        found = marker.get("format") if isinstance(marker, dict) else None
        raise DlmError(f"{path} was written in format {found!r}; this dlm reads {', '.join(READABLE_FORMATS)}")
    config = load_yaml(path / "config.yaml")
    data = config.get("data")
    if isinstance(data, dict) and "sft_length" not in data and _maybe_pairs(data.get("data", "shakespeare")):
        # prompt/response runs from before data.sft_length filled every row to seq_len; on text
        # blocks the setting has no effect, so such a run reads as the default (a comparison or
        # a resume that plans the default then finds nothing changed)
        data["sft_length"] = "model"
    return from_dict(config)


def _maybe_pairs(spec) -> bool:
    """Whether a run's data may have been prompt/response rows; unknown counts as yes (a Hugging
    Face dataset is not loaded to find out, a .jsonl file that is gone may have held pairs).
    (A run's ``data_identity`` is a hash: it cannot say.)"""
    from dlm.data import is_pairs_data

    if not isinstance(spec, str) or spec.startswith("hf:") or (spec.endswith(".jsonl") and not Path(spec).is_file()):
        return True
    try:
        return is_pairs_data(spec)
    except DlmError:
        return True


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
    """Write checkpoint ``step`` and point ``latest`` at it; a failure leaves the previous one.

    A full disk or an unwritable folder ends in one line (a DlmError that is also an
    OSError); the temporary folder is removed and ``latest`` still names a complete one.
    """
    ckpts = Path(run_dir) / "checkpoints"
    name = f"step_{step:08d}"
    final = ckpts / name
    ensure_dir(ckpts)
    if not final.exists():
        _write_checkpoint(final, step, model, ema, trainer)
    atomic_write_text(ckpts / "latest", name + "\n")
    # prune: keep the newest `keep` complete checkpoints (and any in-progress temp folders of others)
    for old in _complete_checkpoints(ckpts)[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file`` with its header's ``__metadata__`` in sorted key order:
    safetensors writes that map in the order of a Rust hash map, which changes from process
    to process, so the same tensors gave files of different bytes about half the time. The
    header is rewritten in place (the same entries, so the same length and tensor offsets)."""
    save_file(tensors, path, metadata=metadata)
    if not metadata or len(metadata) < 2:
        return
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # cannot happen for the same entries; a bug if it does
            raise RuntimeError(f"safetensors header of {path} grew from {size} to {len(text)} bytes when sorted")
        f.seek(8)
        f.write(text.ljust(size, b" "))  # safetensors pads its header with spaces


def _write_state(folder: Path, step: int, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None,
                 trainer: dict[str, Any]) -> None:
    """The files of one checkpoint, into ``folder``; the clock's counters apart in ``clock.json``."""
    save_tensors(model, folder / "model.safetensors", metadata={"format": RUN_FORMAT, "step": str(step)})
    if ema is not None:
        save_tensors({k: v.contiguous().cpu() for k, v in ema.items()}, folder / "ema.safetensors")
    torch.save({k: v for k, v in trainer.items() if k not in CLOCK_KEYS}, folder / "trainer.pt")
    clock = {k: trainer[k] for k in CLOCK_KEYS if k in trainer}
    (folder / CLOCK).write_text(json.dumps(clock))
    (folder / "meta.json").write_text(json.dumps({"format": RUN_FORMAT, "step": step}))


def _write_checkpoint(final: Path, step: int, model: torch.nn.Module, ema: dict[str, torch.Tensor] | None,
                      trainer: dict[str, Any]) -> None:
    """Fill a temporary folder, flush it, and rename it to ``final`` in one step."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = make_temp_dir(final.parent, f".tmp-{final.name}-")
    try:
        # torch.save and safetensors report a full disk as RuntimeError / SafetensorError;
        # diagnosed here, while the partial files still fill the disk
        with writing(final, also=(RuntimeError, SafetensorError)):
            _write_state(tmp, step, state, ema, trainer)
            for f in tmp.iterdir():
                honour_umask(f)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


SHARDS = "dcp"  # inside a checkpoint of several processes: the optimiser state, sharded (torch.distributed.checkpoint)


def begin_checkpoint(run_dir: Path, step: int) -> Path | None:
    """The temporary folder for checkpoint ``step`` of a run on several processes (rank 0
    makes it; every rank writes its shards into ``SHARDS`` inside); None if that checkpoint
    is complete already. :func:`commit_checkpoint` finishes it."""
    ckpts = Path(run_dir) / "checkpoints"
    final = ckpts / f"step_{step:08d}"
    ensure_dir(ckpts)
    if final.exists():
        return None
    return make_temp_dir(ckpts, f".tmp-{final.name}-")


def commit_checkpoint(run_dir: Path, step: int, tmp: Path | None, model: dict[str, torch.Tensor],
                      ema: dict[str, torch.Tensor] | None, trainer: dict[str, Any], keep: int = 2) -> Path:
    """Rank 0, once every rank has written its shards into ``tmp``: add the whole weights
    (``model``, ``ema``: full state dicts, so one process can load them), ``trainer.pt``
    and ``meta.json``, flush, rename into place, and point ``latest`` at it — as
    :func:`save_checkpoint` does. ``tmp`` None: the checkpoint exists, only ``latest`` moves.
    A failure removes ``tmp`` and leaves the previous checkpoint named in ``latest``.
    """
    ckpts = Path(run_dir) / "checkpoints"
    name = f"step_{step:08d}"
    final = ckpts / name
    if tmp is not None:
        try:
            with writing(final, also=(RuntimeError, SafetensorError)):
                _write_state(tmp, step, {k: v.contiguous() for k, v in model.items()}, ema, trainer)
                for f in sorted(tmp.rglob("*")):
                    if f.is_file():
                        honour_umask(f)
                        with open(f, "rb") as fh:
                            os.fsync(fh.fileno())
                for d in [p for p in tmp.rglob("*") if p.is_dir()]:
                    fsync_dir(d)
                os.rename(tmp, final)
            fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    atomic_write_text(ckpts / "latest", name + "\n")
    for old in _complete_checkpoints(ckpts)[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_shards(run_dir: Path) -> Path | None:
    """The sharded optimiser state of the newest checkpoint, if processes wrote one."""
    folder = latest_checkpoint(run_dir) / SHARDS
    return folder if folder.is_dir() else None


def _complete_checkpoints(ckpts: Path) -> list[Path]:
    """The complete checkpoint folders in ``ckpts``, oldest first."""
    if not ckpts.is_dir():
        return []
    return sorted(p for p in ckpts.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and (p / "meta.json").is_file())


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the run has written a checkpoint (``latest`` exists or a complete one does)."""
    ckpts = Path(run_dir) / "checkpoints"
    return (ckpts / "latest").exists() or bool(_complete_checkpoints(ckpts))


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Delete temporary folders a killed process left behind (never a complete checkpoint)."""
    ckpts = Path(run_dir) / "checkpoints"
    if ckpts.is_dir():
        for tmp in ckpts.glob(".tmp-step_*"):
            shutil.rmtree(tmp, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path:
    """The folder ``checkpoints/latest`` names, which must be one of this run's checkpoints.

    A run killed between renaming its first checkpoint into place and writing ``latest``
    has none: the newest complete checkpoint stands in for it.
    """
    ckpts = Path(run_dir) / "checkpoints"
    try:
        name = (ckpts / "latest").read_text(errors="replace").strip()
    except FileNotFoundError:
        done = _complete_checkpoints(ckpts)
        if not done:
            raise DlmError(
                f"{run_dir} has no checkpoint yet (its run stopped before the first one): "
                "start it again with the same `dlm train` command, without --resume"
            ) from None
        return done[-1]
    except OSError as e:
        raise DlmError(f"cannot read {ckpts / 'latest'}: {e.strerror}") from None
    if not CHECKPOINT_NAME.fullmatch(name):
        raise DlmError(f"{ckpts / 'latest'} names {name[:80]!r}, which is not a checkpoint of this run (step_NNNNNNNN)")
    path = ckpts / name
    if not (path / "meta.json").is_file():
        raise DlmError(f"checkpoint {path} named in 'latest' is missing or incomplete")
    return path


def load_checkpoint(run_dir: Path, with_trainer: bool = True) -> Checkpoint:
    path = latest_checkpoint(run_dir)
    try:
        meta = json.loads((path / "meta.json").read_text())
        step = meta["step"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DlmError(f"checkpoint {path} is corrupt ({path / 'meta.json'} unreadable)") from None
    if not isinstance(step, int) or isinstance(step, bool):
        raise DlmError(f"checkpoint {path} is corrupt ({path / 'meta.json'} has step {step!r}, not a number)")
    if meta.get("format") not in READABLE_FORMATS:
        raise DlmError(f"checkpoint {path} has format {meta.get('format')!r}, expected one of {', '.join(READABLE_FORMATS)}")

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
        if not isinstance(trainer, dict):
            found = type(trainer).__name__
            raise DlmError(f"checkpoint file {path / 'trainer.pt'} is corrupt: it holds a {found}, not a dict")
        trainer.update(_read_clock(path))
    return Checkpoint(step, model, ema, trainer)


def _read_clock(path: Path) -> dict[str, Any]:
    """The clock's counters of checkpoint ``path`` (``{}`` for one from before ``clock.json``,
    whose ``trainer.pt`` holds them)."""
    if not (path / CLOCK).exists():
        return {}
    try:
        clock = json.loads((path / CLOCK).read_text())
    except (OSError, ValueError):
        raise DlmError(f"checkpoint file {path / CLOCK} is corrupt") from None
    if not isinstance(clock, dict) or not all(isinstance(clock.get(k, 0), (int, float)) for k in CLOCK_KEYS):
        raise DlmError(f"checkpoint file {path / CLOCK} is corrupt: expected an object of numbers {', '.join(CLOCK_KEYS)}")
    return {k: clock[k] for k in CLOCK_KEYS if k in clock}


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Load a state dict, turning shape or key mismatches into one clear line."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise DlmError(
            f"checkpoint {source} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}): "
            "a different family, tokenizer or model size?"
        )
    for key, tensor in weights.items():
        if own[key].shape != tensor.shape:
            raise DlmError(
                f"checkpoint {source} does not fit this model: {key} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(own[key].shape)} (a different family, tokenizer or model size?)"
            )
    model.load_state_dict(weights)
