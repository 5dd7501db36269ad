"""Ancestral (DDPM-style) sampling of Gaussian embedding diffusion (VDM / Plaid).

From z_1 ~ N(0, I) at every generated position (clean positions and padding hold their clean
embedding e(x) throughout), for steps t = 1 → 0 on a uniform grid of T steps, the network
gives p_θ(x0 | z_t) at the generated positions (after temperature / top-k / top-p), the
denoised embedding is its expectation x̂ = Σ_v p_θ(v | z_t) e(v), and

    z_s ~ q(z_s | z_t, x = x̂) = N(μ, σ²_Q I)       (``GaussianProcess.posterior``).

At the last step (s = 0) the tokens are drawn from the same filtered p_θ(x0 | z_{1/T}) instead
(temperature 0: the argmax), so the output is token ids of the data vocabulary with every
clean position as given. One network call per step on the whole batch (``nfe`` = T); the trace
(``record``) holds the nearest tokens of each z, then the sample. Guidance
needs nothing here: the family's ``Guided`` wrapper takes the vector state and hides the clean
positions with a draw of the prior.

A self-conditioned network (``process.self_condition`` > 0) reads at each step the previous
step's estimate x̂ of the unfiltered network (its softmax's expectation of e, zero at the
first step and at clean positions, as in training), kept here beside z; guidance passes the
same estimate to both of its halves. The state z, the prior draw and the trace are unchanged.
"""

from __future__ import annotations

import torch

from dlm.processes.gaussian import GaussianProcess
from dlm.samplers.base import DiffusionSamplerSettings, Sampler, filter_logits, sample_categorical


class GaussianAncestralSampler(Sampler):
    name = "ancestral"
    Settings = DiffusionSamplerSettings

    @torch.no_grad()
    def sample(self, model, process: GaussianProcess, given, clean, generator, time_conditioned: bool = False,
               pad=None):
        """(B, L) tokens and the network calls; ``clean`` positions are kept as in ``given``."""
        steps, (num, _), device = self.settings.steps, given.shape, given.device
        fixed = clean if pad is None else clean | pad
        free = ~fixed
        e_given = process.embed(given)  # (B, L, C)
        z = torch.where(fixed[..., None], e_given, process.prior(given.shape, generator, device).to(e_given.dtype))
        out = given.clone()
        E = process.embeddings()
        self.record(self.nearest(z, E, given, free))
        if not bool(free.any()):
            return out, 1
        times = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
        # self-conditioning: the previous step's estimate x̂ at the generated positions (zero at the first step
        # and at clean positions and padding, as in training), the raw network's (before filtering)
        estimate = {"self_cond": torch.zeros_like(z)} if process.self_conditioned else {}
        for i in range(steps):
            t, s = times[i], times[i + 1]
            t_batch = torch.full((num,), float(t), device=device) if time_conditioned else None
            raw = model(z, t_batch, score_mask=free, pad=pad, **estimate)  # (N, V)
            logits = filter_logits(raw, self.options)  # (N, V) float64
            if i == steps - 1:  # s = 0: map to tokens
                out[free] = sample_categorical(logits, generator)
                self.record(out)
                break
            if estimate:
                estimate["self_cond"] = estimate["self_cond"].clone()
                estimate["self_cond"][free] = raw.float().softmax(-1).to(E.dtype) @ E
            x_hat = logits.softmax(-1).to(E.dtype) @ E  # (N, C)
            mean, std = process.posterior(z[free], x_hat, t, s)
            noise = torch.randn(z.shape, generator=generator, device=device, dtype=z.dtype)  # (B, L, C), all rows
            z = z.clone()
            z[free] = mean + std.to(z.dtype) * noise[free]
            self.record(self.nearest(z, E, given, free))
        return out, steps

    @staticmethod
    def nearest(z: torch.Tensor, E: torch.Tensor, given: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
        """(B, L) ids for the trace: the given tokens, and at generated positions the token whose
        embedding is nearest to z (all embeddings have unit norm: the largest z · e(v))."""
        return torch.where(free, (z @ E.T).argmax(-1), given)
