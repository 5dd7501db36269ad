"""GIDD's mask + uniform hybrid as a family (``--family gidd``; docs/gidd.md): the preset's
components, and the piece of its bound below ε that the shared Monte Carlo integral leaves out.

``DiffusionFamily.nll`` integrates the ELBO over t ∈ [ε, 1] (ε = ``EVAL_T_MIN``). Below ε the
masked part of the integrand is O(1) per unit time (an O(ε) piece, omitted as for MDLM), but a
uniform token appears at rate ∝ B/(2√t): the piece is O(√ε), about 7·10⁻⁴ nats per nat of the
network's cost at a noised token at p_u = 0.1. So for p_u > 0 the bound adds ∫₀^ε by
importance sampling, t = ε u⁴ with u uniform (density q(t) = ε^(−1/4) t^(−3/4) / 4), one draw
per sequence: an unbiased estimate of the rest of the ELBO, with the network queried at the
drawn time. Why u⁴: the integrand's O(1/√t) comes from a uniform token, an event of
probability ∝ √t whose term is ∝ 1/t; with t = ε u^k the estimate's second moment is
∫ t^(1/2 − 1/k − 1) dt, finite only for k > 2 (k = 2, q ∝ 1/√t, matches the mean's growth but
has a log-divergent variance). At p_u = 0 the bound is MDLM's
NELBO exactly (same draws), its O(ε) piece omitted as there.
"""

from __future__ import annotations

import torch

from dlm.batch import Batch
from dlm.families.diffusion import EVAL_T_MIN, DiffusionFamily
from dlm.objectives.base import Corrupted

GiddPreset = DiffusionFamily.preset("gidd", "mask + uniform hybrid", "hybrid", default_objective="elbo",
                                    bound_objective="elbo", default_time_conditioning=True)


class Gidd(GiddPreset):
    """The ``gidd`` preset with its bound's piece below ε (module docstring)."""

    def nll(self, model, batch, generator, mc_samples):
        total = super().nll(model, batch, generator, mc_samples)
        if self.process.settings.p_u == 0:
            return total
        return total + self.tail(model, batch, generator)

    @torch.no_grad()
    def tail(self, model, batch: Batch, generator) -> torch.Tensor:
        """(B,) float64: an unbiased one-draw estimate of ∫₀^ε f_t dt per sequence (t = ε u⁴).

        The corruption is drawn at the float64 time (in float32, 1 − ᾱ_t and so the uniform
        share B√(ᾱ(1 − ᾱ)) vanish below t ≈ 6·10⁻⁸, where the integrand is largest); the
        network and the ELBO's weights read the float32 time, exact for a small number."""
        x0 = batch.x0
        u = torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=torch.float64)
        t = EVAL_T_MIN * u ** 4
        xt = self.process.corrupt(x0, t, generator, batch.fixed)
        c = Corrupted(x0, xt, t.float(), batch.target)
        t = c.t.double()
        return self.bound_nats(model, c, batch) * 4.0 * EVAL_T_MIN ** 0.25 * t ** 0.75  # f(t) / q(t)
