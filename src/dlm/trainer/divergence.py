"""A non-finite loss stops the run before a diverged model is logged or saved: :class:`DivergenceGuard`."""

from __future__ import annotations

import torch

from dlm.errors import DlmError


class DivergenceGuard:
    """Each step folds its loss's finiteness into a flag on the device (no host
    synchronisation); :meth:`check` reads it (one), before a step is logged or saved."""

    def __init__(self, device: torch.device, step: int):
        self.diverged = torch.zeros((), dtype=torch.bool, device=device)  # a non-finite loss since the last check
        self.checked = step  # the last step whose losses were all seen finite

    def observe(self, loss: torch.Tensor) -> None:
        self.diverged |= ~torch.isfinite(loss)

    def check(self, step: int, saved: int | None) -> None:
        """Raise DlmError if a loss since the last check was not finite; ``saved`` is the step of
        the run's newest checkpoint (None: there is none), which the message names."""
        if bool(self.diverged):
            where = f"the checkpoint of step {saved} is intact" if saved is not None else "no checkpoint was written"
            raise DlmError(f"training diverged: the loss became non-finite between steps {self.checked + 1} and {step}; "
                           f"{where} (try a lower train.lr)")
        self.checked = step
