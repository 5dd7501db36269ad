"""Masked diffusion language model (MDLM, Sahoo et al. 2024)."""

from __future__ import annotations

import torch

from dlm.families.base import Family
from dlm.objectives import MASKED_OBJECTIVES, MDLMNelbo
from dlm.processes import MaskedProcess, antithetic_times
from dlm.samplers import MASKED_SAMPLERS
from dlm.schedules import get_schedule

TRAIN_T_MIN = 1e-3  # MDLM's sampling_eps: keeps the 1/t weight of the log-linear schedule bounded
EVAL_T_MIN = 1e-5  # the bound omits ∫_0^{1e-5}, at most ~1e-5 · log|V| nats per token


class MDLM(Family):
    name = "mdlm"
    # MDLM trains masked diffusion without time conditioning: the mask count already tells
    # the network the noise level, and it makes the sampler's p(x0) cache exact.
    default_time_conditioning = False

    def __init__(self, cfg, vocab_size, eos_id):
        super().__init__(cfg, vocab_size, eos_id)
        self.process = MaskedProcess(vocab_size, get_schedule(cfg.schedule))
        self.objective = MASKED_OBJECTIVES.get(cfg.objective or "nelbo")()
        self.bound = MDLMNelbo()
        self.sampler_cls = MASKED_SAMPLERS.get(cfg.sampler or "ancestral")

    @property
    def input_vocab_size(self) -> int:
        return self.process.input_vocab_size

    def _score(self, objective, model, x0, xt, t):
        where = objective.positions(x0, xt, self.process)  # (B, L)
        logits = model(xt, t if self.time_conditioned else None, positions=where)  # (N, V)
        return objective(logits, x0, xt, t, self.process, where)  # (B,)

    def loss(self, model, x0, generator):
        t = antithetic_times(x0.shape[0], generator, x0.device, TRAIN_T_MIN)
        xt = self.process.corrupt(x0, t, generator)
        return self._score(self.objective, model, x0, xt, t).mean() / x0.shape[1]

    def nll(self, model, x0, generator, mc_samples):
        B = x0.shape[0]
        # per sequence, K antithetic times (u_b + k/K) mod 1 stretched to [EVAL_T_MIN, 1]
        u = torch.rand(B, generator=generator, device=x0.device)
        total = torch.zeros(B, device=x0.device, dtype=torch.float64)
        for k in range(mc_samples):
            t = EVAL_T_MIN + (1.0 - EVAL_T_MIN) * ((u + k / mc_samples) % 1.0)
            xt = self.process.corrupt(x0, t, generator)
            total += self._score(self.bound, model, x0, xt, t).double()
        return (1.0 - EVAL_T_MIN) * total / mc_samples

    def sample(self, model, num, length, prompt, generator, steps, options):
        sampler = self.sampler_cls(steps, options)
        return sampler.sample(model, self.process, num, length, prompt, generator, self.time_conditioned)
