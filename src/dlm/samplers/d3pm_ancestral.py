"""Ancestral sampling of discrete-time diffusion (D3PM).

From x_T ~ π (all [MASK], or uniform noise), over a grid of ``steps`` integer times
T = i_0 > i_1 > … > i_steps = 0 (all T steps when ``steps`` = T, else a stride of them),
every generated position draws

    x_s ~ p_θ(x_s | x_t) ∝ Q_{t|s}[x_s, x_t] · (x̃ Q̄_s)[x_s],   x̃ = p̃_θ(x0 | x_t)

(``DiscreteTime.reverse_log_probs``) with x̃ after temperature / top-k / top-p. With
``steps`` = T/k rounded to the nearest integer this samples from the very model whose NELBO
``dlm eval`` reports with ``eval.time_stride`` = k (one ``step_grid`` for both). The network
runs only where the step depends on it (absorbing: the masked positions); clean positions are
kept as given.
"""

from __future__ import annotations

import torch

from dlm.errors import DlmError
from dlm.processes.discrete import step_grid
from dlm.samplers.base import DiffusionSamplerSettings, Sampler, filter_logits, sample_categorical, start_from_prior
from dlm.samplers.masked_ancestral import NetworkCalls, evaluate_rows


class D3PMAncestralSampler(Sampler):
    name = "ancestral"
    Settings = DiffusionSamplerSettings
    chunk = 4096  # positions of (N, S) float64 buffers at a time

    @torch.no_grad()
    def sample(self, model, process, given, clean, generator, time_conditioned: bool, pad=None):
        steps, T = self.settings.steps, process.steps
        if steps > T:
            raise DlmError(f"sampler.steps must be ≤ the process's T = {T} steps (process.steps), got {steps}")
        num, device = given.shape[0], given.device
        x, fixed = start_from_prior(process, given, clean, pad, generator)
        self.record(x)
        counter = NetworkCalls(num)
        grid = step_grid(T, steps, device)
        alphas = process.schedule.alpha(grid.double() / T)
        for k in range(steps):
            where = process.predicted(x) & ~fixed  # (B, L)
            if not where.any():
                self.record(x)
                continue
            t = torch.full((num,), float(grid[k]) / T, device=device) if time_conditioned else None
            logits = evaluate_rows(model, x, where, t, pad, counter)  # (N, V)
            xt = x[where]
            new = torch.empty_like(xt)
            for r in range(0, len(xt), self.chunk):
                sl = slice(r, r + self.chunk)
                log_x0 = process.log_probs_x0(filter_logits(logits[sl], self.options))  # float64 (n, S)
                n = len(log_x0)
                log_p = process.reverse_log_probs(xt[sl], log_x0, alphas[k].expand(n), alphas[k + 1].expand(n))
                new[sl] = sample_categorical(log_p, generator)
            x = x.clone()
            x[where] = new
            self.record(x)
        self.stats = counter.as_dict()
        return x, counter.nfe
