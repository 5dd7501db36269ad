"""Uniform-state diffusion language models (USDM): UDLM / Duo's forward process with the
objectives of SDDLM (Zhu et al. 2025, arXiv 2510.22926).

``--family usdm --objective nelbo | naive | sddlm | sddlm-v1 | sddlm-v2``. Whatever the
objective, ``dlm eval`` reports the exact continuous-time NELBO, so models trained with
different objectives compare on one bound.

Time conditioning is on by default (as in UDLM): unlike a masked sequence, a uniformly
corrupted one does not say how much of it is noise.
"""

from __future__ import annotations

import torch

from dlm.families.base import Family
from dlm.objectives import UNIFORM_OBJECTIVES, UniformNelbo
from dlm.processes import UniformProcess, low_discrepancy
from dlm.samplers import UNIFORM_SAMPLERS
from dlm.schedules import get_schedule

TRAIN_T_MIN = 1e-3  # as MDLM's sampling_eps
EVAL_T_MIN = 1e-5  # the bound omits ∫_0^{1e-5}; its integrand is finite there (≈ (1/p_θ(x0) − 1)/V per token)
EVAL_CHUNK = 1 << 26  # the NELBO holds a few (B, L, V) float32 tensors: score ≤ 2^26 of those elements at a time


class USDM(Family):
    name = "usdm"
    default_time_conditioning = True

    def __init__(self, cfg, vocab_size, eos_id):
        super().__init__(cfg, vocab_size, eos_id)
        self.process = UniformProcess(vocab_size, get_schedule(cfg.schedule))
        self.objective = UNIFORM_OBJECTIVES.get(cfg.objective or "nelbo").from_config(cfg)
        self.bound = UniformNelbo()
        self.sampler_cls = UNIFORM_SAMPLERS.get(cfg.sampler or "ancestral")

    def _logits(self, model, xt, t, where):
        return model(xt, t if self.time_conditioned else None, positions=where)

    def loss(self, model, x0, generator):
        frac = low_discrepancy(x0.shape[0], generator, x0.device)
        t = TRAIN_T_MIN + (1.0 - TRAIN_T_MIN) * frac
        xt, noised = self.process.corrupt_with_noise(x0, t, generator)
        where = self.objective.positions(x0, xt, noised)
        return self.objective(self._logits(model, xt, t, where), x0, xt, t, self.process, where, generator)

    def nll(self, model, x0, generator, mc_samples):
        B = x0.shape[0]
        u = torch.rand(B, generator=generator, device=x0.device)  # K antithetic draws (u_b + k/K) mod 1
        total = torch.zeros(B, device=x0.device, dtype=torch.float64)
        rows = max(1, EVAL_CHUNK // (x0.shape[1] * self.vocab_size))
        for j in range(mc_samples):
            t = EVAL_T_MIN + (1.0 - EVAL_T_MIN) * ((u + j / mc_samples) % 1.0)
            xt = self.process.corrupt(x0, t, generator)
            for r in range(0, B, rows):  # at the GPT-2 vocabulary (B, L, V) probabilities do not fit at once
                sl = slice(r, r + rows)
                logits = self._logits(model, xt[sl], t[sl], None)
                total[sl] += self.bound.per_sequence(logits, x0[sl], xt[sl], t[sl], self.process)
        return (1.0 - EVAL_T_MIN) * total / mc_samples

    def sample(self, model, num, length, prompt, generator, steps, options):
        sampler = self.sampler_cls(steps, options)
        return sampler.sample(model, self.process, num, length, prompt, generator, self.time_conditioned)
