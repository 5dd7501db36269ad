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
import math
from dataclasses import dataclass

import torch

from dlm.device import to_host, true_positions
from dlm.settings import setting
from dlm.processes.masked import MaskedProcess
from dlm.samplers.base import DiffusionSamplerSettings, Sampler, filter_logits, sample_categorical, start_from_prior
from dlm.samplers.graphs import GraphedTrunk, trunk_for


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
    idx = true_positions(where.any(-1), len(rows))  # no copy from the host (on CUDA it would wait)
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
        positions are kept as in ``given``. At most one host synchronisation a network call
        (:meth:`_cached`, :meth:`_reference`); the time grid and the unmasking probabilities
        are host floats, tokens are written by flat index (no boolean masks)."""
        steps = self.settings.steps
        x, fixed = start_from_prior(process, given, clean, pad, generator)  # (B, L)
        times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)  # on the host
        p_unmask = process.unmask_probability(times[:-1], times[1:]).tolist()[:-1] + [1.0]
        counter = NetworkCalls(given.shape[0])
        self.record(x)
        run = self._cached if self.settings.cache else self._reference
        x = run(model, process.mask_id, x, p_unmask, times.tolist(), generator, time_conditioned, pad, counter)
        self.stats = counter.as_dict()
        return x, counter.nfe

    def _cached(self, model, mask_id: int, x, p_unmask: list[float], times: list[float], generator,
                time_conditioned: bool, pad, counter: NetworkCalls) -> torch.Tensor:
        """The per-row cache's steps, one host read a network call: the step's uniforms do not
        depend on the network, so the uniforms of a *window* of steps are drawn ahead
        (:func:`draw_ahead`) and one read gives every step's unmasking counts per row; the
        steps before the first that unmasks something are empty (nothing to compute), the
        generator is put back to just after that step's uniforms, and that step runs. The
        window is sized so that it holds an unmasking step but with probability < 1e-6
        (:func:`window_length`); the first one spans every step (the masks left are not known
        on the host before it). The random draws are the step-by-step ones."""
        num, steps, i, left = x.shape[0], len(p_unmask), 0, None
        before = generator.get_state()
        while i < steps and left != 0:
            masked = x == mask_id
            width = window_length(p_unmask, i, left)
            first, states = draw_ahead(masked, p_unmask[i:i + width], generator)
            counts = unmask_counts(first, width)  # (width, B)
            read = to_host(torch.cat([counts.reshape(-1), masked.sum().reshape(1)]))  # the one read
            if left is None and not read[-1]:  # nothing to generate: no step, no draw
                generator.set_state(before)
                break
            left = read[-1]
            per_step = [read[k * num:(k + 1) * num] for k in range(width)]
            hit = next((k for k in range(width) if any(per_step[k])), None)
            for _ in range(width if hit is None else hit):  # the empty steps: nothing changes
                self.record(x)
            if hit is None:
                i += width
                continue
            generator.set_state(states[hit])  # the uniforms of the steps after this one: not drawn yet
            per_row, n = per_step[hit], sum(per_step[hit])
            unmask = masked & (first == hit)  # (B, L): the positions that unmask at step i + hit
            t_batch = torch.full((num,), times[i + hit], device=x.device) if time_conditioned else None
            rows = evaluate_counted(model, x, unmask, t_batch, pad, counter, per_row)
            tokens = sample_categorical(filter_logits(rows, self.options), generator)
            x = x.reshape(-1).scatter(0, true_positions(unmask, n), tokens).view_as(x)
            left, i = left - n, i + hit + 1
            self.record(x)
        return x

    def _reference(self, model, mask_id: int, x, p_unmask: list[float], times: list[float], generator,
                   time_conditioned: bool, pad, counter: NetworkCalls) -> torch.Tensor:
        """``cache: false``: the whole batch at every step that has masks left, one host read a
        step (= a network call): the step's unmasking counts and the masks left. The first
        call, before any read, computes the logits at every position. Through a
        :meth:`trunk` (CUDA: a graph at fixed (B, L)), the output layer runs after the read,
        at the positions that unmask."""
        num, left = x.shape[0], None
        trunk = self.trunk(model, x, torch.full((num,), 1.0, device=x.device) if time_conditioned else None, pad)
        for i, p in enumerate(p_unmask):
            if left == 0:
                break
            masked = x == mask_id
            t_batch = torch.full((num,), times[i], device=x.device) if time_conditioned else None
            counter.calls += 1
            counter.rows += num
            if trunk is not None:
                h = trunk.hidden(x, t_batch)  # (B, L, C)
            else:  # (left, V) at the masked positions; (B·L, V) at the first step
                logits = model(x, t_batch, score_mask=None if left is None else masked, pad=pad, score_count=left)
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
            unmask = masked & (u < p)
            read = to_host(torch.cat([unmask.sum(-1), masked.sum().reshape(1)]))  # the step's one read
            per_row, n = read[:-1], sum(read[:-1])
            if n:  # (n, V): the masked positions that unmask now
                if trunk is not None:
                    rows = trunk.logits(h, true_positions(unmask, n))
                else:
                    at = true_positions(unmask, n) if left is None else true_positions(
                        unmask.reshape(-1)[true_positions(masked, read[-1])], n)
                    rows = logits.reshape(-1, logits.shape[-1])[at]
                tokens = sample_categorical(filter_logits(rows, self.options), generator)
                x = x.reshape(-1).scatter(0, true_positions(unmask, n), tokens).view_as(x)
            left = read[-1] - n
            self.record(x)
        return x

    def trunk(self, model, x: torch.Tensor, t: torch.Tensor | None, pad) -> GraphedTrunk | None:
        """The whole-batch network of ``cache: false`` as a CUDA graph at fixed (B, L), on CUDA
        for the dlm transformer (a guided model is not one); None: plain calls."""
        return trunk_for(model, x, t, pad)


UNLIKELY = 1e-6  # the chance a window of steps drawn ahead holds no unmasking step, at most


def window_length(p_unmask: list[float], i: int, left: int | None) -> int:
    """The steps from ``i`` on to draw ahead: the fewest in which ``left`` masks (each
    unmasking independently with the step's probability) all stay masked with probability
    below :data:`UNLIKELY`; every remaining step when ``left`` is unknown (None). The last
    step's probability is 1, so the window never runs past it."""
    if left is None:
        return len(p_unmask) - i
    log_none, bound = 0.0, math.log(UNLIKELY)
    for k in range(i, len(p_unmask)):
        log_none += left * math.log1p(-p_unmask[k]) if p_unmask[k] < 1 else -math.inf
        if log_none < bound:
            return k - i + 1
    return len(p_unmask) - i


def draw_ahead(masked: torch.Tensor, p_unmask: list[float], generator: torch.Generator):
    """(first, states): the step uniforms of a window of ``len(p_unmask)`` steps, drawn one
    step at a time as the step-by-step sampler draws them (float64, (B, L) each). ``first``
    (B, L) long: the first step k of the window at which a ``masked`` position's uniform falls
    below p_k (the window's length where none does, and at unmasked positions); ``states``
    the generator's state after each step's draw."""
    width, device = len(p_unmask), masked.device
    u = torch.empty(masked.shape, dtype=torch.float64, device=device)
    below = torch.empty((width, *masked.shape), dtype=torch.bool, device=device)  # (width, B, L)
    states = []
    for k, p in enumerate(p_unmask):  # two kernels a step (p a host float: no copy to the device)
        torch.rand(masked.shape, generator=generator, device=device, dtype=torch.float64, out=u)
        torch.lt(u, p, out=below[k])
        states.append(generator.get_state())
    below &= masked
    return torch.where(below.any(0), below.to(torch.uint8).argmax(0), width), states  # argmax: the first


def unmask_counts(first: torch.Tensor, width: int) -> torch.Tensor:
    """(width, B): how many positions of each row :func:`draw_ahead` has unmask first at each step."""
    B = first.shape[0]
    slot = (first * B + torch.arange(B, device=first.device)[:, None]).reshape(-1)
    counts = torch.zeros((width + 1) * B, dtype=torch.long, device=first.device)
    return counts.scatter_add_(0, slot, torch.ones_like(slot))[:width * B].view(width, B)
