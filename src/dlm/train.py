"""The training loop. It never asks which process or objective is in use: the family
turns a batch into a loss, the loop does the rest (accumulation, clipping, AdamW with
warm-up + cosine decay, EMA, logging, atomic checkpoints, exact resume, clean stops)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dlm.checkpoint import create_run_dir, load_checkpoint, load_weights, remove_partial_checkpoints, save_checkpoint
from dlm.config import RunConfig
from dlm.data import BlockLoader, TokenData, load_tokenizer, prepare_data
from dlm.data.cache import require_blocks
from dlm.device import autocast, generator, resolve_device
from dlm.distributed import Dist, init_distributed
from dlm.errors import DlmError
from dlm.families import FAMILIES, Family


@dataclass
class TrainResult:
    step: int
    elapsed_s: float
    tokens: int
    tokens_per_s: float
    loss: float
    params: int
    interrupted: str | None = None  # the signal's name when a signal stopped the run


def check_config(cfg: RunConfig) -> None:
    t, d = cfg.train, cfg.data
    checks = [
        (t.steps > 0, f"train.steps must be > 0, got {t.steps}"),
        (t.batch_size > 0, f"train.batch_size must be > 0, got {t.batch_size}"),
        (t.grad_accum > 0, f"train.grad_accum must be > 0, got {t.grad_accum}"),
        (t.lr > 0, f"train.lr must be > 0, got {t.lr}"),
        (0 <= t.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {t.ema_decay}"),
        (d.seq_len >= 2, f"data.seq_len must be ≥ 2, got {d.seq_len}"),
        (d.seq_len <= 65536, f"data.seq_len {d.seq_len} is more than this backbone takes (65536)"),
        (t.log_every > 0, f"train.log_every must be > 0, got {t.log_every}"),
    ]
    for ok, message in checks:
        if not ok:
            raise DlmError(message)
    FAMILIES.get(cfg.family)


class EMA:
    """Exponential moving average of the weights, with the usual warm-up of the decay,
    min(decay, (1 + n) / (10 + n)), so short runs are not dominated by the initial weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)


def lr_at(cfg: RunConfig, step: int, progress: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from lr to lr·min_lr_ratio."""
    t = cfg.train
    warm = min(1.0, (step + 1) / max(1, t.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return t.lr * warm * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine)


class _StopFlag:
    """First Ctrl-C / SIGTERM: finish the step, checkpoint, exit. Second: stop at once."""

    def __init__(self):
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal}: finishing this step and writing a checkpoint (again to abort)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of the noise (times, masks) of one optimiser step on one rank.

    Deriving it from (seed, rank, step) instead of carrying a generator along makes a
    resumed run draw exactly the noise the uninterrupted run drew, on any number of ranks.
    """
    return int(hashlib.sha1(f"{seed}/{rank}/{step}".encode()).hexdigest()[:15], 16)


class MetricsLog:
    """``metrics.jsonl`` (and TensorBoard, when installed) of one run; a no-op when disabled
    (every rank but 0). Lines past ``keep_until`` — a crashed run's — are dropped first."""

    def __init__(self, run_dir: Path, keep_until: int, enabled: bool = True):
        self.file = self.tb = None
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= keep_until]
            path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a", encoding="utf-8")
        try:  # never required
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:
            self.tb = None

    def write(self, rec: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        if self.tb is not None:
            for key, value in rec.items():
                if key != "step":
                    self.tb.add_scalar(key, value, rec["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


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
    dist = init_distributed(device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    try:
        return _train(cfg, Path(out), resume, progress and dist.is_main, data, device, dist)
    finally:
        dist.shutdown()


def _train(cfg: RunConfig, out: Path, resume: bool, progress: bool, data: TokenData | None,
           device: torch.device, dist: Dist) -> TrainResult:
    torch.manual_seed(cfg.train.seed)
    if data is None:
        tokenizer = load_tokenizer(out / "tokenizer.json") if resume else None
        if not dist.is_main:
            dist.barrier()  # rank 0 tokenises (and trains the BPE) once; the others read its cache
        data = prepare_data(cfg.data, tokenizer)
        if dist.is_main:
            dist.barrier()
    require_blocks(data.train, cfg.data.seq_len, "training")
    tok = data.tokenizer
    family: Family = FAMILIES.get(cfg.family)(cfg, tok.vocab_size, tok.eos_id)
    model = family.build_model().to(device)
    params = model.num_params()

    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.train.lr,
        betas=(cfg.train.beta1, cfg.train.beta2),
        fused=device.type == "cuda",
    )
    ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    # one global batch of batch_size × world blocks per micro-step; rank r takes rows r::world
    loader = BlockLoader(data.train, cfg.data.seq_len, cfg.train.batch_size * dist.world, cfg.train.seed)

    step, elapsed_before, tokens = 0, 0.0, 0
    if resume:
        if dist.is_main:
            remove_partial_checkpoints(out)  # a SIGKILLed writer's leftovers
        ckpt = load_checkpoint(out)
        load_weights(model, ckpt.model, out)
        if ema is not None and ckpt.ema is not None:
            ema.shadow = {k: v.to(device) for k, v in ckpt.ema.items()}
        st = ckpt.trainer
        try:
            opt.load_state_dict(st["optimizer"])
            loader.load_state_dict(st["loader"])
            torch.set_rng_state(st["torch_rng"])
            if device.type == "cuda" and st.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(st["cuda_rng"], device)
        except (KeyError, ValueError, RuntimeError) as e:
            raise DlmError(f"checkpoint in {out} does not fit this run: {e}") from None
        step, elapsed_before, tokens = ckpt.step, float(st["elapsed_s"]), int(st["tokens"])
        if step >= cfg.train.steps:
            raise DlmError(f"{out} already finished {step} steps; pass a larger --steps to train further")
    elif dist.is_main:
        create_run_dir(out, cfg, tok)
    net = dist.wrap(model)

    def trainer_state() -> dict[str, Any]:
        return {
            "optimizer": opt.state_dict(),
            "loader": loader.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "elapsed_s": elapsed_before + (time.perf_counter() - t_start),
            "tokens": tokens,
        }

    def checkpoint() -> None:
        if dist.is_main:
            save_checkpoint(out, step, model, ema.shadow if ema else None, trainer_state(), cfg.train.keep_checkpoints)
        dist.barrier()

    metrics = MetricsLog(out, step, enabled=dist.is_main)
    accum = cfg.train.grad_accum
    tokens_per_step = cfg.train.batch_size * accum * cfg.data.seq_len * dist.world
    budget = cfg.train.time_budget_s
    bar = tqdm(
        total=cfg.train.steps, initial=step, disable=not progress, unit="step", file=sys.stderr,
        desc=f"{cfg.family} {params / 1e6:.1f}M", dynamic_ncols=True,
    )
    t_start = time.perf_counter()
    window_loss, window_steps, window_t, last_loss = 0.0, 0, t_start, float("nan")
    stopped_by: str | None = None
    model.train()
    try:
        with _StopFlag() as stop:
            while step < cfg.train.steps:
                elapsed = elapsed_before + time.perf_counter() - t_start
                if budget > 0:  # every rank must use the same learning rate
                    elapsed = dist.all_reduce([elapsed], op="max")[0]
                prog = max(step / cfg.train.steps, elapsed / budget if budget > 0 else 0.0)
                lr = lr_at(cfg, step, prog)
                for group in opt.param_groups:
                    group["lr"] = lr
                noise = generator(device, step_seed(cfg.train.seed, dist.rank, step))
                step_loss = 0.0
                for micro in range(accum):
                    x0 = loader.next_batch()[dist.rank :: dist.world].to(device, non_blocking=True)
                    sync = micro == accum - 1 or not dist.enabled  # DDP: all-reduce grads once per step
                    with contextlib.nullcontext() if sync else net.no_sync():
                        with autocast(device):
                            loss = family.loss(net, x0, noise)
                        (loss / accum).backward()  # each backward sums grads: average here
                    step_loss += loss.item() / accum
                step_loss = dist.all_reduce([step_loss])[0]
                if not math.isfinite(step_loss):
                    raise DlmError(
                        f"training diverged: loss is {step_loss} at step {step + 1}; "
                        "the last checkpoint is intact (try a lower train.lr)"
                    )
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
                )
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                tokens += tokens_per_step
                if ema is not None:
                    ema.update(model, step)
                window_loss += step_loss
                window_steps += 1
                last_loss = step_loss
                bar.update(1)
                now = time.perf_counter()
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    tps = window_steps * tokens_per_step / max(now - window_t, 1e-9)
                    rec = {
                        "step": step,
                        "loss": window_loss / window_steps,
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "tokens": tokens,
                        "tokens_per_s": tps,
                        "elapsed_s": elapsed_before + now - t_start,
                    }
                    metrics.write(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
                    window_loss, window_steps, window_t = 0.0, 0, now
                if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0:
                    checkpoint()
                # stop together: a signal on any rank, or the time budget, stops every rank
                signalled = stop.signal is not None
                over_budget = budget > 0 and elapsed_before + now - t_start >= budget
                signalled, over_budget = (v > 0 for v in dist.all_reduce([float(signalled), float(over_budget)], op="max"))
                if signalled:
                    stopped_by = stop.signal or "SIGTERM"
                    break
                if over_budget:
                    break
            checkpoint()
    finally:
        bar.close()
        metrics.close()
    elapsed = elapsed_before + time.perf_counter() - t_start
    return TrainResult(
        step=step,
        elapsed_s=elapsed,
        tokens=tokens,
        tokens_per_s=tokens / max(elapsed, 1e-9),
        loss=last_loss,
        params=params,
        interrupted=stopped_by,
    )
