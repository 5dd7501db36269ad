"""Losses of discrete-time diffusion (D3PM, Austin et al. 2021, arXiv 2107.03006).

The negative ELBO over T steps (D3PM eq. 1), per sequence,

    L_vb = KL(q(x_T | x0) ‖ p(x_T)) + Σ_{i=2}^{T} E_q KL(q(x_{i−1} | x_i, x0) ‖ p_θ(x_{i−1} | x_i))
           + E_q −log p_θ(x0 | x_1),

every term in the closed form of :mod:`dlm.processes.discrete`. The family draws one step i
uniformly from {1, …, T} per sequence (``Corrupted.t`` = i/T) and the objective scores term i
(the reconstruction term for i = 1), so T·term_i is an unbiased estimate of the sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm.settings import setting
from dlm.objectives.base import Corrupted, Objective, Scored, per_sequence, token_count


def step_terms(logits, c: Corrupted, where, process, dtype, prev: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) KL(q(x_s | x_t, x0) ‖ p_θ(x_s | x_t)) at the ``where`` positions for t = i/T and
    s = prev[i]/T (``prev``: (T + 1,) the step each jump lands on; None: s = i − 1), and the
    (N, S) log p̃_θ(x0 | x_t) it used."""
    T = process.steps
    i = (c.t.double() * T).round()  # (B,) the step of each row
    s = (i - 1).clamp_min(0) if prev is None else prev.to(i.device)[i.long()].double()
    rows = where.nonzero(as_tuple=True)[0]
    alpha_t = process.schedule.alpha(i / T)[rows]
    alpha_s = process.schedule.alpha(s / T)[rows]
    log_p_x0 = process.log_probs_x0(logits.to(dtype))  # (N, S)
    kl = process.posterior_kl(c.xt[where], c.x0[where], log_p_x0, alpha_t, alpha_s)
    return kl, log_p_x0


@dataclass
class HybridSettings:
    # λ of D3PM's hybrid loss L_vb + λ·E_q[−log p̃_θ(x0 | x_t)] (eq. 5); 0: L_vb alone
    ce_weight: float = setting(0.01, lo=0)


class D3PMHybrid(Objective):
    """D3PM's hybrid loss, per sequence: T·term_i + λ·Σ_l −log p̃_θ(x0^l | x_i), both over the
    target positions where the reverse step depends on the network (absorbing: the masked
    ones). This is eq. 5 of the paper with its expectation over i estimated by one draw: the
    first part estimates the whole L_vb (the reported loss is ≈ the NELBO plus λ·CE). The
    released D3PM code adds the per-step term unscaled, i.e. it weights the CE T times more
    relative to L_vb: ``objective.ce_weight`` = λ·T reproduces that weighting."""

    name = "hybrid"
    Settings = HybridSettings

    def __call__(self, logits, c, where, process) -> Scored:
        kl, log_p_x0 = step_terms(logits, c, where, process, torch.float32)
        nats = process.steps * per_sequence(kl, where)
        if self.settings.ce_weight > 0:
            ce = -log_p_x0.gather(-1, c.x0[where][:, None])[:, 0]
            nats = nats + self.settings.ce_weight * per_sequence(ce, where)
        return Scored(nats, token_count(c.target))


class D3PMStepTerm(Objective):
    """One term of the NELBO of the model that jumps over ``grid`` (T = i_0 > … > 0, from
    :func:`dlm.processes.discrete.step_grid`; None: every step), float64, for ``dlm eval``: the
    family sums it over the grid (the bound itself, not an estimate of the sum)."""

    name = "step-term"

    def __init__(self, settings=None, grid: torch.Tensor | None = None):
        super().__init__(settings)
        self.prev = None
        if grid is not None:  # prev[i_k] = i_{k+1}: where the jump from each grid time lands
            self.prev = torch.zeros(int(grid[0]) + 1, dtype=torch.long)
            self.prev[grid[:-1].cpu()] = grid[1:].cpu()

    def __call__(self, logits, c, where, process) -> Scored:
        kl, _ = step_terms(logits, c, where, process, torch.float64, self.prev)
        return Scored(per_sequence(kl, where), token_count(c.target))
