"""Ancestral sampling of masked diffusion (MDLM), with a per-row p(x0) cache.

From x_1 = every generated position [MASK] (clean positions hold their given tokens), for
steps t = 1 → 0 on a uniform grid of T steps, each masked position independently

  * unmasks with probability (α_s − α_t)/(1 − α_t), taking a token drawn from
    p_θ(x0 | x_t) (after temperature / top-k / top-p), or
  * stays masked.

Unmasked and clean positions never change. At the last step s = 0, α_s = 1, so every
remaining mask unmasks: the output holds no [MASK].

**The per-row cache** (``cache``, on by default). A step reads p_θ(x0 | x_t) only at the
positions that unmask at that step, and a row's x_t changes only at the steps where it
unmasks something. So the sampler draws each step's uniforms first and runs the network
only on the rows that unmask something now, only at those positions: a row is computed
exactly when its tokens changed since its logits were last computed *and* they are needed,
and nothing has to be stored between steps (every computed logit is used at once). This is
MDLM's ``ddpm_cache`` made per row: with 16 rows a single row that unmasks no longer makes
the other 15 call the network again. The random draws (one float64 uniform per position per
step, then one Gumbel draw per unmasking position, row-major over the batch) are the same
with or without the cache, so the tokens are too (up to the last bit of the logits: a row
computed alone or with fewer positions can differ from the full-batch call in float32
rounding; tests compare in float64). It is exact for time-conditioned models as well: the
rows computed at a step get that step's t, like the uncached call.

``cache: false`` runs the whole batch at every step that has masks left (the reference).

**NFE.** ``sample`` returns the network evaluations in *full-batch equivalents*:
⌈rows computed / batch size⌉ (at batch 1: the number of calls). ``self.stats`` keeps
``calls`` (network invocations, any number of rows), ``rows`` (row evaluations) and
``batch``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from dlm.device import to_host, true_positions
from dlm.settings import setting
from dlm.processes.masked import MaskedProcess
from dlm.samplers.base import DiffusionSamplerSettings, Sampler, filter_logits, sample_categorical, start_from_prior


class NetworkCalls:
    """Counts a sample's network calls and row evaluations; ``nfe`` in full-batch equivalents."""

    def __init__(self, batch: int):
        self.batch, self.calls, self.rows = batch, 0, 0

    @property
    def nfe(self) -> int:
        return -(-self.rows // self.batch) if self.batch else 0

    def as_dict(self) -> dict:
        return {"calls": self.calls, "rows": self.rows, "batch": self.batch, "nfe": self.nfe}


def _row_view(model, idx: torch.Tensor):
    """``model`` for the rows ``idx`` of the batch: a guided model (``samplers.guidance.Guided``)
    holds per-row clean masks and hidden tokens, which are sliced to those rows."""
    from dlm.samplers.guidance import Guided

    if isinstance(model, Guided):
        view = copy.copy(model)
        view.clean, view.hidden = model.clean[idx], model.hidden[idx]
        return view
    return model


def evaluate_rows(model, x, where, t, pad, counter: NetworkCalls, rows: torch.Tensor | None = None):
    """Float32 logits (N, V) at the N true positions of ``where`` (B, L), row-major, from one
    network call on the rows ``rows`` (B,) bool only (default: the rows where ``where`` has a
    true position; ``where`` must be false outside them). ``t``: None, or (B,) times."""
    num = x.shape[0]
    if rows is None:
        rows = where.any(-1)
    n = int(rows.sum())
    counter.calls += 1
    counter.rows += n
    if n == num:
        return model(x, t, score_mask=where, pad=pad)
    idx = rows.nonzero()[:, 0]
    return _row_view(model, idx)(x[idx], None if t is None else t[idx], score_mask=where[idx],
                                 pad=None if pad is None else pad[idx])


def evaluate_counted(model, x, where, t, pad, counter: NetworkCalls, per_row: list[int]):
    """:func:`evaluate_rows` when the host knows ``per_row`` (B,), the true positions of each row
    of ``where``: the rows with any run, and nothing makes a host synchronisation (the rows
    are picked by an index built on the host, the positions gathered by their count)."""
    rows = [b for b, n in enumerate(per_row) if n]
    counter.calls += 1
    counter.rows += len(rows)
    if len(rows) == x.shape[0]:
        return model(x, t, score_mask=where, pad=pad, score_count=sum(per_row))
    idx = torch.tensor(rows, device=x.device)
    return _row_view(model, idx)(x[idx], None if t is None else t[idx], score_mask=where[idx],
                                 pad=None if pad is None else pad[idx], score_count=sum(per_row))


def time_of_alpha(schedule, alpha: torch.Tensor, iters: int = 64) -> torch.Tensor:
    """The t ∈ [0, 1] with schedule.alpha(t) = ``alpha`` (float64, elementwise), by bisection
    (every schedule is decreasing from α(0) = 1 to α(1) = 0)."""
    alpha = alpha.double()
    lo, hi = torch.zeros_like(alpha), torch.ones_like(alpha)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = schedule.alpha(mid) > alpha  # still too clean: t is later
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


@dataclass
class MaskedAncestralSettings(DiffusionSamplerSettings):
    cache: bool = setting(True)  # run the network only on the rows that unmask at a step (per-row p(x0) cache)


class MaskedAncestralSampler(Sampler):
    name = "ancestral"
    Settings = MaskedAncestralSettings

    @torch.no_grad()
    def sample(self, model, process: MaskedProcess, given, clean, generator, time_conditioned: bool, pad=None):
        """(B, L) tokens and the network evaluations (full-batch equivalents); ``clean``
        positions are kept as in ``given``. One host synchronisation before the first step and
        one a step (the step's unmasking counts per row); the time grid and the unmasking
        probabilities are host floats, tokens are written by flat index (no boolean masks)."""
        steps = self.settings.steps
        num = given.shape[0]
        device = given.device
        x, fixed = start_from_prior(process, given, clean, pad, generator)  # (B, L)
        times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)  # on the host
        p_unmask = process.unmask_probability(times[:-1], times[1:]).tolist()[:-1] + [1.0]
        times = times.tolist()
        counter = NetworkCalls(num)
        self.record(x)
        left = to_host((x == process.mask_id).sum())  # masks left, known on the host from here on
        for i in range(steps):
            if not left:
                break
            masked = x == process.mask_id
            t_batch = torch.full((num,), times[i], device=device) if time_conditioned else None
            if not self.settings.cache:  # the whole batch, at every masked position
                logits = self._full(model, x, masked, t_batch, pad, counter, left)
            u = torch.rand(x.shape, generator=generator, device=device, dtype=torch.float64)
            unmask = masked & (u < p_unmask[i])
            per_row = to_host(unmask.sum(-1))  # the step's one host synchronisation
            n = sum(per_row)
            if n:
                if self.settings.cache:  # only the rows that unmask now, only where they unmask
                    rows = evaluate_counted(model, x, unmask, t_batch, pad, counter, per_row)
                else:  # (n, V): the masked positions that unmask now
                    rows = logits[true_positions(unmask.reshape(-1)[true_positions(masked, left)], n)]
                tokens = sample_categorical(filter_logits(rows, self.options), generator)
                x = x.reshape(-1).scatter(0, true_positions(unmask, n), tokens).view_as(x)
                left -= n
            self.record(x)
        self.stats = counter.as_dict()
        return x, counter.nfe

    @staticmethod
    def _full(model, x, masked, t_batch, pad, counter: NetworkCalls, left: int):
        """(left, V) logits at every masked position of the whole batch (``cache: false``)."""
        counter.calls += 1
        counter.rows += x.shape[0]
        return model(x, t_batch, score_mask=masked, pad=pad, score_count=left)
