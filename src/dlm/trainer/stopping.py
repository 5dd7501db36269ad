"""When the loop stops: ``train.steps`` reached, the time budget spent, or Ctrl-C / SIGTERM
(:class:`Stopping`, with :class:`StopFlag` catching the signals)."""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

from dlm.distributed import Dist
from dlm.trainer.state import TrainState


class StopFlag:
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


class Stopping:
    """The run's end: ``steps`` optimiser steps, or ``budget_s`` seconds of training (0: no
    budget), or a signal. Every rank stops together: a signal on any rank, or the time budget,
    stops them all (agreed on logging steps when there are several processes: one collective
    there, none between). Inside ``with``, the signals are caught."""

    def __init__(self, steps: int, budget_s: float, dist: Dist):
        self.steps, self.budget, self.dist = steps, budget_s, dist
        self.flag = StopFlag()
        self.stopped = False
        self.stopped_by: str | None = None  # the signal's name when a signal stopped the run
        self.time_budget_ended = False  # the time budget, not train.steps, ended the run

    def __enter__(self) -> Stopping:
        self.flag.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.flag.__exit__(*exc)

    def should_continue(self, step: int) -> bool:
        return not self.stopped and step < self.steps

    def progress(self, state: TrainState) -> float:
        """How far the run is, by steps or by the time budget (whichever is further): the
        learning-rate schedule's clock, the same on every rank."""
        elapsed = state.elapsed(time.perf_counter())
        if self.budget > 0:  # every rank must use the same learning rate
            elapsed = self.dist.all_reduce([elapsed], op="max")[0]
        return max(state.step / self.steps, elapsed / self.budget if self.budget > 0 else 0.0)

    def after_step(self, state: TrainState, now: float, logging: bool) -> None:
        """Whether to stop after the step just taken (``logging``: a step every rank logs)."""
        signalled = self.flag.signal is not None
        over_budget = self.budget > 0 and state.elapsed(now) >= self.budget
        if self.dist.enabled:
            if not logging:
                return
            signalled, over_budget = (v > 0 for v in self.dist.all_reduce([float(signalled), float(over_budget)],
                                                                          op="max"))
        if signalled:
            self.stopped_by = self.flag.signal or "SIGTERM"
        self.stopped = signalled or over_budget
        self.time_budget_ended = over_budget and not signalled and state.step < self.steps
