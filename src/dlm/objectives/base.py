"""The one contract every objective follows, whatever its family.

An objective sees a corrupted batch (:class:`Corrupted`), says where it needs the network's
logits (``score_mask``, (B, L) bool: the output layer runs only there), and turns those
logits, (N, V) in row-major order, into :class:`Scored`: per-sequence nats and the number
of tokens they are normalised by. The training loop divides the sum of nats over the whole
optimiser step (every micro-batch, every rank) by the sum of counts, so a loss is the same
per-token mean however the step is split across accumulation and processes.

Clean context and padding are never target: no objective scores them (``score_mask`` is
always inside ``Corrupted.target``), and the logits there are never read.

Settings: each objective declares a ``Settings`` dataclass (ranges via
``dlm.settings.setting``); the run config's ``objective:`` section is checked against it in
one place (``dlm.families.resolve_components``) and the objective is built from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dlm.settings import NoSettings


@dataclass
class Corrupted:
    """A batch after the forward process: what an objective scores."""

    x0: torch.Tensor  # (B, L) data
    xt: torch.Tensor  # (B, L) corrupted tokens (x0 at clean and padded positions)
    t: torch.Tensor  # (B,) time, or k/n for an objective estimated over the masked count
    target: torch.Tensor  # (B, L) bool: neither clean nor padding (what is corrupted and scored)
    noised: torch.Tensor | None = None  # (B, L) bool: positions the process resampled (uniform state)
    negatives: torch.Tensor | None = None  # (B, L, K) objective-specific draws (SDDLM-V1's negatives)

    def rows(self, sl) -> "Corrupted":
        def take(v):
            return None if v is None else v[sl]

        return Corrupted(self.x0[sl], self.xt[sl], self.t[sl], self.target[sl], take(self.noised), take(self.negatives))


@dataclass
class Scored:
    nats: torch.Tensor  # (B,) the loss of each sequence in nats (a bound's terms, or a cross-entropy sum)
    count: torch.Tensor  # (B,) the tokens those nats are normalised by

    def mean(self) -> torch.Tensor:
        """Σ nats / Σ count over this batch alone (the loop normalises over the whole step)."""
        return self.nats.sum() / self.count.sum().clamp_min(1)


def per_sequence(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Sum (N,) values taken at the true entries of ``where`` (B, L) back per row: (B,)."""
    rows = where.nonzero(as_tuple=True)[0]
    out = torch.zeros(where.shape[0], dtype=values.dtype, device=values.device)
    return out.index_add_(0, rows, values)


def token_count(mask: torch.Tensor) -> torch.Tensor:
    """(B,) float number of true entries per row."""
    return mask.sum(-1).float()


class Objective:
    name: ClassVar[str]
    Settings: ClassVar[type] = NoSettings
    # True: estimated over the number k of masked tokens (the family masks exactly k target
    # positions, k uniform on {1..n}) instead of over a time t
    by_count: ClassVar[bool] = False

    def __init__(self, settings=None):
        self.settings = settings if settings is not None else self.Settings()

    def score_mask(self, c: Corrupted) -> torch.Tensor:
        """(B, L) bool: where the loss needs logits (always inside ``c.target``)."""
        return c.target

    def draw(self, c: Corrupted, generator: torch.Generator, process) -> Corrupted:
        """Draw any noise of the objective's own over the whole batch (before it is split
        across ranks, so the draws do not depend on the number of processes)."""
        return c

    def __call__(self, logits: torch.Tensor, c: Corrupted, where: torch.Tensor, process) -> Scored:
        raise NotImplementedError

    def token_weights(self, c: Corrupted, where: torch.Tensor, process) -> tuple[torch.Tensor, torch.Tensor] | None:
        """((B, L) weights w, (B,) count) when the objective is a weighted cross-entropy,
        nats_b = Σ_l w_bl · −log p_θ(x0_bl | ·) with w zero outside ``where``; None otherwise.
        Such an objective can be scored at every position with static shapes (no boolean
        gather, no host synchronisation: ``train.static_shapes``, ``dlm.objectives.chunked``)."""
        return None

    def score(self, predict: "Predictor", c: Corrupted, where: torch.Tensor, process) -> Scored:
        """Scored from the network: by default one pass, the logits at ``where`` handed to
        ``__call__``. An objective whose loss needs more of the network — a second pass, a
        reconstruction term at t ≈ 0 — overrides this and calls ``predict`` as often as it
        needs (such an objective is scored whole: ``train.loss_chunk_rows`` chunks only the
        one-pass kind)."""
        return self(predict(where), c, where, process)

    @classmethod
    def one_pass(cls) -> bool:
        """Whether the objective is ``__call__`` on one pass's logits (``score`` not overridden)."""
        return cls.score is Objective.score


class Predictor:
    """The network as an objective calls it. ``predict(where)`` → float logits (N, V) at the N
    true positions of ``where`` (B, L), row-major, from the inputs the family prepared (x_t,
    the time when the model is time-conditioned, the padding); ``predict(where, x=…, t=…)``
    runs another pass on other inputs (x: (B, L) ids or (B, L, C) vectors)."""

    def __init__(self, model, x: torch.Tensor, t: torch.Tensor | None, pad: torch.Tensor | None,
                 time_conditioned: bool):
        self.model, self.x, self.t, self.pad, self.time_conditioned = model, x, t, pad, time_conditioned

    def __call__(self, where: torch.Tensor, x: torch.Tensor | None = None, t: torch.Tensor | None = None):
        x = self.x if x is None else x
        t = (self.t if t is None else t) if self.time_conditioned else None
        if x.is_floating_point():  # vectors (B, L, C): a continuous process's state
            return self.model(None, t, embeds=x, score_mask=where, pad=self.pad)
        return self.model(x, t, score_mask=where, pad=self.pad)
