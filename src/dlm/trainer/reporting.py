"""What a run reports while it trains: :class:`Reporter` (the progress bar and the
``metrics.jsonl`` records of the logged steps)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dlm.config import RunConfig
from dlm.trainer.metrics_log import MetricsLog
from dlm.trainer.state import TrainState


class Reporter:
    """The progress bar, and every ``train.log_every`` steps (and at the last) one record of
    the steps since the previous one: their mean loss, the last step's lr and gradient norm,
    the counters, and the throughput's fields. The losses stay on the device until then."""

    def __init__(self, cfg: RunConfig, out: Path, state: TrainState, params: int, enabled: bool, progress: bool):
        self.metrics = MetricsLog(out, state.step, enabled=enabled)
        self.bar = tqdm(
            total=cfg.train.steps, initial=state.step, disable=not progress, unit="step", file=sys.stderr,
            desc=f"{cfg.family} {params / 1e6:.1f}M", dynamic_ncols=True,
        )
        self.window_loss: torch.Tensor | float = 0.0
        self.window_steps = 0
        self.last: tuple[torch.Tensor, float, torch.Tensor] | None = None  # the last step's loss, lr, grad norm

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        self.metrics.close()

    def step_done(self, loss: torch.Tensor, lr: float, grad_norm: torch.Tensor) -> None:
        self.window_loss = self.window_loss + loss
        self.window_steps += 1
        self.last = (loss, lr, grad_norm)
        self.bar.update(1)

    def write(self, state: TrainState, now: float, throughput: dict[str, Any]) -> None:
        """The record of the window ending at step ``state.step`` (a host synchronisation)."""
        _, lr, grad_norm = self.last
        rec = {
            "step": state.step,
            "loss": float(self.window_loss) / self.window_steps,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": state.tokens,
            "elapsed_s": state.elapsed(now),
            **throughput,
        }
        if "tokens_per_s" in rec:
            mfu = {"mfu": f"{rec['mfu']:.1%}"} if "mfu" in rec else {}
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:,.0f}", **mfu, refresh=False)
        self.metrics.write(rec)
        self.window_loss, self.window_steps = 0.0, 0

    def final_loss(self) -> float:
        """The last step's loss (NaN when this session trained none)."""
        return float(self.last[0]) if self.last is not None else float("nan")
