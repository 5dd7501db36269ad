"""Ancestral sampling of uniform-state diffusion.

From x_1 ~ uniform noise, for steps t = 1 → 0 on a uniform grid of T steps, every position
(the prompt prefix excepted) draws

    x_s ~ q(x_s | x_t, x_θ),  x_θ = p_θ(x0 | x_t) after temperature / top-k / top-p,

the closed-form posterior of ``UniformProcess.posterior`` with the network's prediction in
place of x0. Every position may change at every step, including tokens that an earlier
step already made "clean": this is the self-correction that masked diffusion lacks.

The last step (s = 0) is greedy: each position takes the argmax of q(x_0 | x_t, x_θ), which
is x_θ reweighted by the likelihood of the current token (V α_t δ(k = x_t) + 1 − α_t).
Each step draws from the posterior as the mixture it is (keep x_t / draw from x_θ / draw
uniformly), so the V-wide float64 Gumbel draw runs only where a position takes a new token
from x_θ; the greedy step's float64 posterior is computed ``chunk`` rows at a time so a 50k
vocabulary never needs a (B·L, V) float64 buffer for the whole batch.
"""

from __future__ import annotations

import torch

from dlm.processes.uniform import UniformProcess
from dlm.samplers.base import SamplingOptions, filter_logits, sample_categorical


class UniformAncestralSampler:
    name = "ancestral"

    def __init__(self, steps: int, options: SamplingOptions, greedy_last: bool = True, chunk: int = 4096):
        if steps < 1:
            raise ValueError(f"`steps` must be > 0, got {steps}")
        self.steps, self.options, self.greedy_last, self.chunk = steps, options, greedy_last, chunk

    def _greedy(self, logits, xt, alpha_t, alpha_s, process):
        """argmax of the posterior (N,), ``chunk`` rows at a time (float64)."""
        out = torch.empty_like(xt)
        for i in range(0, len(xt), self.chunk):
            sl = slice(i, i + self.chunk)
            x_theta = filter_logits(logits[sl], self.options).softmax(-1)
            out[sl] = process.posterior(xt[sl], x_theta, alpha_t, alpha_s).argmax(-1)
        return out

    def _own_probability(self, logits, xt):
        """x_θ at the current token of each row (N,) float64, after filtering."""
        opts = self.options
        if opts.temperature > 0 and not opts.top_k and opts.top_p >= 1.0:  # no filter: one logsumexp, no (N, V) float64
            scaled = logits.float() / opts.temperature
            own = scaled.gather(-1, xt[:, None])[:, 0] - scaled.logsumexp(-1)
            return own.double().exp()
        out = torch.empty(len(xt), dtype=torch.float64, device=xt.device)
        for i in range(0, len(xt), self.chunk):
            sl = slice(i, i + self.chunk)
            out[sl] = filter_logits(logits[sl], opts).softmax(-1).gather(-1, xt[sl, None])[:, 0]
        return out

    def _draw(self, logits, xt, alpha_t, alpha_s, process, generator):
        """x_s ~ q(x_s | x_t, x_θ) (N,), drawn as the three-part mixture the posterior is:

            keep x_t with prob (V α_t x_θ,i + α_t/α_s − α_t) / Z,
            draw from x_θ with prob (α_s − α_t) / Z,
            draw uniformly with prob (α_s − α_t)(1 − α_s) / (α_s Z),   Z = V α_t x_θ,i + 1 − α_t.

        The V-wide float64 Gumbel draw runs only at the rows that pick x_θ (a fraction of about
        1/T of them per step), like the masked sampler draws only where it unmasks."""
        V = process.vocab_size
        a_t, a_s = float(alpha_t), float(alpha_s)
        x_own = self._own_probability(logits, xt)  # (N,)
        z = V * a_t * x_own + 1.0 - a_t
        keep = (V * a_t * x_own + a_t / a_s - a_t) / z
        from_x = (a_s - a_t) / z
        u = torch.rand(xt.shape, generator=generator, device=xt.device, dtype=torch.float64)
        out = xt.clone()
        pick_x = (u >= keep) & (u < keep + from_x)
        pick_uniform = u >= keep + from_x
        if pick_x.any():
            rows = pick_x.nonzero()[:, 0]
            for i in range(0, len(rows), self.chunk):
                r = rows[i : i + self.chunk]
                out[r] = sample_categorical(filter_logits(logits[r], self.options), generator)
        n_uniform = int(pick_uniform.sum())
        if n_uniform:
            out[pick_uniform] = torch.randint(0, V, (n_uniform,), generator=generator, device=xt.device)
        return out

    @torch.no_grad()
    def sample(self, model, process: UniformProcess, num: int, length: int, prompt, generator, time_conditioned: bool):
        device = next(model.parameters()).device
        x = process.prior((num, length), generator, device)
        n_prompt = 0 if prompt is None else len(prompt)
        if n_prompt:
            x[:, :n_prompt] = prompt.to(device)
        free = torch.ones_like(x, dtype=torch.bool)
        free[:, :n_prompt] = False
        times = torch.linspace(1.0, 0.0, self.steps + 1, device=device, dtype=torch.float64)
        alphas = process.schedule.alpha(times)
        for i in range(self.steps):
            t_batch = torch.full((num,), float(times[i]), device=device) if time_conditioned else None
            logits = model(x, t_batch, positions=free)  # (N, V) at the generated positions
            last = i == self.steps - 1
            if last and self.greedy_last:
                new = self._greedy(logits, x[free], alphas[i], alphas[i + 1], process)
            else:
                new = self._draw(logits, x[free], alphas[i], alphas[i + 1], process, generator)
            x = x.clone()
            x[free] = new
        return x, self.steps
