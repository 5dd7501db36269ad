"""Uniform-state diffusion (D3PM-uniform in continuous time; UDLM, Schiff et al. 2024,
arXiv 2412.10193; Duo, Sahoo et al. 2025, arXiv 2506.10892).

Forward marginal, per token independently, with π = 1/V the uniform distribution:

    q(x_t | x0) = α_t · e_{x0} + (1 − α_t) · π,

i.e. a token is kept with probability α_t and otherwise replaced by a token drawn
uniformly from the whole vocabulary (which may, with probability 1/V, be x0 again: the
fraction of positions that actually change is (1 − α_t)(1 − 1/V)). There is no extra
input token; the prior at t = 1 (α = 0) is uniform noise.

Reverse posterior for s < t, written for a probability vector x over the vocabulary (x0
one-hot, or the network's prediction x_θ), in O(V) per position with no V×V matrix.
With α_{t|s} = α_t / α_s and i = x_t:

    q(x_s = k | x_t = i, x) ∝ V α_t x_k δ_{ik} + (α_{t|s} − α_t) δ_{ik}
                              + (α_s − α_t) x_k + (α_s − α_t)(1 − α_s) / (V α_s),

whose normaliser is V α_t x_i + 1 − α_t (Bayes' rule on q(x_t|x_s) q(x_s|x), multiplied
by V; derived in docs/uniform.md). At s = t it is e_{x_t}; at t = 1 it is the forward
marginal q(x_s | x); at s = 0 it is x reweighted by the likelihood of x_t.
"""

from __future__ import annotations

import torch

from dlm.processes.base import Process


class UniformProcess(Process):
    def corrupt(self, x0, t, generator, fixed=None):
        return self.corrupt_with_noise(x0, t, generator, fixed)[0]

    def corrupt_with_noise(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator,
                           fixed: torch.Tensor | None = None):
        """x_t and the positions where noise struck (B, L): resampled uniformly, which may have
        drawn x0 again (x_t ≠ x0 is the subset that actually changed). ``fixed`` positions
        are never struck."""
        alpha_t = self.schedule.alpha(t)[:, None]  # (B, 1)
        u = torch.rand(x0.shape, generator=generator, device=x0.device)
        noise = torch.randint(0, self.vocab_size, x0.shape, generator=generator, device=x0.device)
        noised = u < 1.0 - alpha_t
        if fixed is not None:
            noised = noised & ~fixed
        return torch.where(noised, noise, x0), noised

    def prior(self, shape, generator, device):
        return torch.randint(0, self.vocab_size, shape, generator=generator, device=device)

    def prior_probs(self, dtype=torch.float64):
        return torch.full((self.vocab_size,), 1.0 / self.vocab_size, dtype=dtype)

    def posterior(self, xt: torch.Tensor, x: torch.Tensor, alpha_t: torch.Tensor, alpha_s: torch.Tensor) -> torch.Tensor:
        """q(x_s | x_t, x) as probabilities (…, V).

        ``xt`` (…,) token ids; ``x`` (…, V) a probability vector per position (one-hot x0
        or x_θ); ``alpha_t`` ≤ ``alpha_s`` broadcastable to ``xt`` (α at times t > s).
        Computed in the dtype of ``x``.
        """
        V = self.vocab_size
        a_t = alpha_t.to(x.dtype)[..., None]
        a_s = alpha_s.to(x.dtype)[..., None]
        a_ts = a_t / a_s.clamp_min(torch.finfo(x.dtype).tiny)
        at_xt = torch.zeros_like(x).scatter_(-1, xt[..., None], 1.0)  # e_{x_t}
        x_i = x.gather(-1, xt[..., None])  # (…, 1)
        unnorm = (
            (V * a_t * x_i + (a_ts - a_t)) * at_xt
            + (a_s - a_t) * x
            + (a_s - a_t) * (1.0 - a_s) / (V * a_s.clamp_min(torch.finfo(x.dtype).tiny))
        )
        return unnorm / (V * a_t * x_i + 1.0 - a_t)
