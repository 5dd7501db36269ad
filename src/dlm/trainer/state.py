"""What the loop counts and carries from one session of a run to the next: :class:`TrainState`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainState:
    """The loop's counters. ``state_dict()`` is their part of ``trainer.pt`` (the rest is the
    optimiser, the data position and the random generators: :class:`~dlm.trainer.checkpointer.Checkpointer`);
    the step is the checkpoint's own (its folder name and ``meta.json``), so it is not among them.
    The ones the wall clock decides (``elapsed_s``, ``untimed_*``) are written to ``clock.json``
    beside it (``dlm.checkpoint.CLOCK_KEYS``), so a resumed run's ``trainer.pt`` is an unkilled one's.

    The steps that compiled (the first of each compiled session) are counted apart in
    ``untimed_s`` / ``untimed_tokens``: their time and tokens stay out of tokens/s, summed
    over the sessions of a resumed run.
    """

    step: int = 0
    tokens: int = 0
    elapsed_before: float = 0.0  # seconds trained by the earlier sessions of the run
    untimed_s: float = 0.0
    untimed_tokens: int = 0
    session_start: float = 0.0  # perf_counter() when this session's loop began

    def start_session(self) -> float:
        self.session_start = time.perf_counter()
        return self.session_start

    def elapsed(self, now: float) -> float:
        """Seconds the run has trained at perf_counter() ``now``, every session's."""
        return self.elapsed_before + now - self.session_start

    def state_dict(self) -> dict[str, Any]:
        return {
            "elapsed_s": self.elapsed_before + (time.perf_counter() - self.session_start),
            "tokens": self.tokens,
            "untimed_s": self.untimed_s,
            "untimed_tokens": self.untimed_tokens,
        }

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        """``state`` from ``trainer.pt`` of checkpoint ``step`` (older runs have no ``untimed_*``)."""
        self.step, self.elapsed_before, self.tokens = step, float(state["elapsed_s"]), int(state["tokens"])
        self.untimed_s, self.untimed_tokens = float(state.get("untimed_s", 0.0)), int(state.get("untimed_tokens", 0))
