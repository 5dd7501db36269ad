"""Uniform-state diffusion language models (USDM): UDLM / Duo's forward process with the
objectives of SDDLM (Zhu et al. 2025, arXiv 2510.22926).

``--family usdm --objective nelbo | naive | sddlm | sddlm-v1 | sddlm-v2``. Whatever the
objective, ``dlm eval`` reports the exact continuous-time NELBO, so models trained with
different objectives compare on one bound. The bound is estimated over t ∈ [1e-5, 1] and
omits ∫_0^{1e-5}, whose integrand is finite there (≈ (1/p_θ(x0) − 1)/V per token).

Time conditioning is on by default (as in UDLM): unlike a masked sequence, a uniformly
corrupted one does not say how much of it is noise.
"""

from __future__ import annotations

from dlm.families.diffusion import DiffusionFamily
from dlm.objectives import UNIFORM_OBJECTIVES, Corrupted, UniformNelbo
from dlm.processes import UniformProcess
from dlm.samplers import UNIFORM_SAMPLERS


class USDM(DiffusionFamily):
    name = "usdm"
    default_time_conditioning = True
    process_cls = UniformProcess
    objectives = UNIFORM_OBJECTIVES
    samplers = UNIFORM_SAMPLERS
    default_objective = "nelbo"
    eval_chunk = 1 << 26  # the NELBO holds a few (N, V) float32 tensors: ≤ 2^26 elements at a time

    def make_bound(self):
        return UniformNelbo()

    def corrupt(self, objective, batch, frac, generator, t_min):
        t = t_min + (1.0 - t_min) * frac
        xt, noised = self.process.corrupt_with_noise(batch.x0, t, generator, batch.fixed)
        return Corrupted(batch.x0, xt, t, batch.target, noised)
