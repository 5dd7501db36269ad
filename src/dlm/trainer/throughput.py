"""Tokens/s, model FLOPs utilisation and compile time: :class:`Throughput`."""

from __future__ import annotations

import time
from typing import Any

import torch

from dlm.flops import mfu
from dlm.trainer.state import TrainState


class Throughput:
    """Tokens/s (and MFU, when the device's peak is known) over the window of steps since the
    last log line. The first step of a compiled session builds the kernels: its time, with
    the compiler check's (``probe_s``), is ``compile_s``, reported once and apart, and its
    time and tokens stay out of tokens/s (``TrainState.untimed_*``).

    MFU counts the work actually done: ``head_rows()`` (None: not tracked, the output layer
    counted at every token) is the running number of positions the output layer ran on, whose
    share of the window's tokens scales its ``head_flops`` per position (:mod:`dlm.flops`)."""

    def __init__(self, per_token: float, peak: float | None, device: torch.device, compiling: bool, probe_s: float,
                 head_flops: float = 0.0, head_rows=None):
        self.per_token, self.peak, self.device = per_token, peak, device
        self.head_flops, self.head_rows = head_flops, head_rows
        self.rows_seen, self.window_rows = self._rows(), 0
        self.compiling = compiling  # the next step is the session's first compiled one
        self.probe_s = probe_s
        self.compile_s = 0.0
        self.unlogged = False  # compile_s is not yet in metrics.jsonl
        self.window_t, self.window_tokens = 0.0, 0  # tokens trained since window_t (the compiling step's not counted)

    def start(self, now: float) -> None:
        self.window_t = now

    def step_done(self, t_step: float, tokens: int, state: TrainState) -> None:
        """A step that began at ``t_step`` trained ``tokens`` more."""
        self.window_tokens += tokens
        rows = self._rows()
        self.window_rows, self.rows_seen = self.window_rows + rows - self.rows_seen, rows
        if not self.compiling:
            return
        self.compiling = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the step's kernels too, not only their launch
        self.window_t = time.perf_counter()
        state.untimed_s, state.untimed_tokens = state.untimed_s + self.window_t - t_step, state.untimed_tokens + tokens
        self.compile_s, self.window_tokens, self.unlogged = self.probe_s + self.window_t - t_step, 0, True
        self.window_rows = 0

    def fields(self, now: float) -> dict[str, Any]:
        """The log record's compile_s (once), tokens_per_s and mfu; a new window from ``now``."""
        rec: dict[str, Any] = {}
        if self.unlogged:
            rec["compile_s"], self.unlogged = self.compile_s, False
        if self.window_tokens:  # none when the window held only the compiling step
            tps = self.window_tokens / max(now - self.window_t, 1e-9)
            rec["tokens_per_s"] = tps
            if self.peak:
                share = 1.0 if self.head_rows is None else self.window_rows / self.window_tokens
                rec["mfu"] = mfu(tps, self.per_token - self.head_flops * (1.0 - share), self.peak)
                rec["head_share"] = share
        self.window_tokens, self.window_t, self.window_rows = 0, now, 0
        return rec

    def _rows(self) -> int:
        return 0 if self.head_rows is None else self.head_rows()

    @staticmethod
    def overall(state: TrainState, elapsed: float) -> float:
        """Tokens/s of the whole run, the compiling steps left out."""
        untimed_s, untimed_tokens = state.untimed_s, state.untimed_tokens
        if state.tokens <= untimed_tokens:  # only compiling steps: nothing else to time them by
            untimed_s, untimed_tokens = 0.0, 0
        return (state.tokens - untimed_tokens) / max(elapsed - untimed_s, 1e-9)
