"""A non-finite loss stops the run before a diverged model is logged or saved: :class:`DivergenceGuard`."""

from __future__ import annotations

import torch

from dlm.errors import DlmError


class DivergenceGuard:
    """Each step folds its loss's finiteness into a flag on the device (no host
    synchronisation); :meth:`check` reads it (one), before a step is logged or saved."""

    def __init__(self, device: torch.device, step: int, resumed: bool):
        self.diverged = torch.zeros((), dtype=torch.bool, device=device)  # a non-finite loss since the last check
        self.checked = step  # the last step whose losses were all seen finite
        self.resumed = resumed

    def observe(self, loss: torch.Tensor) -> None:
        self.diverged |= ~torch.isfinite(loss)

    def check(self, step: int) -> None:
        """Raise DlmError if a loss since the last check was not finite."""
        if bool(self.diverged):
            intact = self.checked > 0 or self.resumed
            where = "the last checkpoint is intact" if intact else "no checkpoint was written"
            raise DlmError(f"training diverged: the loss became non-finite between steps {self.checked + 1} and {step}; "
                           f"{where} (try a lower train.lr)")
        self.checked = step
