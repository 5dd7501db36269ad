"""Discrete-time diffusion (D3PM, Austin et al. 2021, arXiv 2107.03006).

``--family d3pm`` with ``process=absorbing`` (default, as in the thesis of arXiv 2507.07050)
or ``process=uniform`` and ``process.steps`` = T (default 1000); objective ``hybrid``
(L_vb + λ·CE, ``objective.ce_weight`` = λ = 0.01); sampler ``ancestral`` over the T steps or
``sampler.steps`` of them.

``dlm eval`` reports the exact NELBO of the T-step model: the prior term in closed form
plus every step term, each an expectation over x_t estimated with ``eval.mc_samples`` draws
of x_t — T network calls per batch and draw. ``eval.time_stride`` = k evaluates the jumps of
the grid of n = T/k (rounded) evenly spaced integer times instead (T, T − k, …, 0 where k
divides T): the exact NELBO of the n-step model, the one ``sampler.steps`` = n samples from.
It is a bound on that model's likelihood, not an estimate of the T-step one. A finer grid
gives a bound no larger only where more context never raises the expected loss per masked
token (the exact denoiser, in expectation over the data); for an arbitrary network nothing
orders them (docs/d3pm.md).

Time conditioning is on by default, as in D3PM.
"""

from __future__ import annotations

import torch

from dlm.families.diffusion import DiffusionFamily
from dlm.objectives import Corrupted
from dlm.objectives.discrete import D3PMStepTerm
from dlm.processes.discrete import step_grid, strided_steps


class D3PM(DiffusionFamily):
    name = "d3pm"
    default_time_conditioning = True
    discrete_time = True
    label = "d3pm"
    process_choices = {"absorbing": "d3pm-absorbing", "uniform": "d3pm-uniform"}
    default_process = "absorbing"
    default_objective = "hybrid"
    eval_chunk = 1 << 25  # the bound holds a few (N, S) float64 tensors: ≤ 2^25 elements at a time

    def make_bound(self):
        return D3PMStepTerm(grid=self.eval_grid())  # rebuilt by ``nll``: the stride may change

    def eval_grid(self) -> torch.Tensor:
        """The times the bound's jumps go through, T > … > 0: the grid the ancestral sampler
        walks with ``sampler.steps`` = T/k rounded (``eval.time_stride`` = k; T, T − k, …, 0
        where k divides T)."""
        T = self.process.steps
        return step_grid(T, strided_steps(T, self.cfg.eval.time_stride))

    def eval_steps(self) -> list[int]:
        """The steps whose terms the bound sums: every time of the grid but the last, 0."""
        return self.eval_grid()[:-1].tolist()

    @classmethod
    def bound_draws_time(cls, cfg) -> bool:
        return False

    @classmethod
    def bound_kind(cls, cfg) -> str:
        return "bound is a sum over its T step terms (eval.time_stride picks them)"

    def bound_info(self):
        return {"process_steps": self.process.steps, "time_stride": self.cfg.eval.time_stride,
                "bound_steps": len(self.eval_steps())}

    def network_steps(self, settings, length):
        return min(settings.steps, self.process.steps)

    def nll(self, model, batch, generator, mc_samples):
        B = batch.x0.shape[0]
        device = batch.x0.device
        T = self.process.steps
        terms = torch.zeros(B, device=device, dtype=torch.float64)
        self.bound = self.make_bound()
        for i in self.eval_steps():
            t = torch.full((B,), i / T, device=device)
            for _ in range(mc_samples):  # draws of x_i ~ q(x_i | x0)
                c = Corrupted(batch.x0, self.process.corrupt(batch.x0, t, generator, batch.fixed), t, batch.target)
                terms += self.bound_nats(model, c, batch, width=self.process.num_states)
        prior = self.process.prior_kl() * batch.target.sum(-1).double()
        return prior + terms / mc_samples
