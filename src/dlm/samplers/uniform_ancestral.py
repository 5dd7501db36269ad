"""Ancestral sampling of uniform-state diffusion.

From x_1 ~ uniform noise, for steps t = 1 → 0 on a uniform grid of T steps, every
generated position (clean ones are kept as given) draws

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

**Per-row cache** (``cache``). For a model without time conditioning, p_θ(x0 | x_t) of a row
depends only on the row's tokens: a row that did not change at a step keeps its logits and
the network runs only on the rows that changed. The draws do not depend on the cache, so the
tokens are those of the uncached sampler (up to float32 rounding of a row computed in a
smaller batch). With time conditioning the logits depend on t, which changes every step:
nothing is reused, every row is computed at every step. ``nfe`` is in full-batch
equivalents, ⌈rows computed / batch size⌉; ``self.stats`` has the calls.

**Greedy tail** (``greedy_tail``, Duo's "greedy-tail sampler", Sahoo et al. 2025 §4.2; the
Duo code's ``sampling.noise_removal=greedy``): after the T steps — all of them draws, the last
one drawing x_0 from q(x_0 | x_t, x_θ) — one more network call at t = 0 and every generated
position takes argmax x_θ(x_0) (the network's own argmax, not the posterior's: temperature,
top-k and top-p do not move an argmax). It replaces ``greedy_last`` and costs one more NFE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm.settings import setting
from dlm.processes.uniform import UniformProcess
from dlm.samplers.base import DiffusionSamplerSettings, Sampler, filter_logits, sample_categorical, start_from_prior
from dlm.samplers.masked_ancestral import NetworkCalls, evaluate_rows


@dataclass
class UniformAncestralSettings(DiffusionSamplerSettings):
    greedy_last: bool = setting(True)  # the last step takes the argmax of q(x_0 | x_t, x_θ)
    greedy_tail: bool = setting(False)  # Duo: every step draws, then one more call takes argmax x_θ (over greedy_last)
    cache: bool = setting(True)  # reuse a row's logits while it does not change (models without time conditioning)


class UniformAncestralSampler(Sampler):
    name = "ancestral"
    Settings = UniformAncestralSettings
    chunk = 4096  # rows of float64 (row, V) buffers at a time

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
    def sample(self, model, process: UniformProcess, given, clean, generator, time_conditioned: bool, pad=None):
        """(B, L) tokens and the network evaluations (full-batch equivalents); ``clean``
        positions are kept as in ``given``."""
        st = self.settings
        steps = st.steps
        num, device = given.shape[0], given.device
        x, fixed = start_from_prior(process, given, clean, pad, generator)  # (B, L)
        self.record(x)
        free = ~fixed
        if not free.any():
            self.stats = NetworkCalls(num).as_dict()
            return x, 0
        times = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
        alphas = process.schedule.alpha(times)
        reuse = st.cache and not time_conditioned
        row_of = free.nonzero()[:, 0]  # (N,): the row of each generated position, row-major
        counter = NetworkCalls(num)
        logits, stale = None, torch.ones(num, dtype=torch.bool, device=device)

        def predict(t):
            nonlocal logits
            t_batch = torch.full((num,), float(t), device=device) if time_conditioned else None
            if logits is None or not reuse:
                logits = evaluate_rows(model, x, free, t_batch, pad, counter, rows=free.any(-1))
            elif stale.any():  # only the rows that changed since their logits were computed
                rows = stale & free.any(-1)
                logits[rows[row_of]] = evaluate_rows(model, x, free & rows[:, None], t_batch, pad, counter, rows=rows)
            return logits

        for i in range(steps):
            predict(times[i])  # (N, V) at the generated positions
            xt = x[free]
            if i == steps - 1 and st.greedy_last and not st.greedy_tail:
                new = self._greedy(logits, xt, alphas[i], alphas[i + 1], process)
            else:
                new = self._draw(logits, xt, alphas[i], alphas[i + 1], process, generator)
            stale = torch.zeros(num, dtype=torch.long, device=device).index_add_(0, row_of, (new != xt).long()) > 0
            x = x.clone()
            x[free] = new
            self.record(x)
        if st.greedy_tail:
            x = x.clone()
            x[free] = predict(times[-1]).argmax(-1)
            self.record(x)
        self.stats = counter.as_dict()
        return x, counter.nfe
