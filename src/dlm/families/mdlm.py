"""Masked diffusion language model (MDLM, Sahoo et al. 2024)."""

from __future__ import annotations

import torch

from dlm.families.base import Family
from dlm.objectives import MASKED_OBJECTIVES, CountNelbo, MDLMNelbo
from dlm.processes import MaskedProcess, low_discrepancy
from dlm.samplers import MASKED_SAMPLERS
from dlm.schedules import get_schedule

TRAIN_T_MIN = 1e-3  # MDLM's sampling_eps: keeps the 1/t weight of the log-linear schedule bounded
EVAL_T_MIN = 1e-5  # time-conditioned bound: omits ∫_0^{1e-5}, at most ~1e-5 · log|V| nats per token


class MDLM(Family):
    name = "mdlm"
    # MDLM trains masked diffusion without time conditioning: the mask count already tells
    # the network the noise level, and it makes the sampler's p(x0) cache exact.
    default_time_conditioning = False

    def __init__(self, cfg, vocab_size, eos_id):
        super().__init__(cfg, vocab_size, eos_id)
        self.process = MaskedProcess(vocab_size, get_schedule(cfg.schedule))
        self.objective = MASKED_OBJECTIVES.get(cfg.objective or "nelbo")()
        # The bound reported by `dlm eval`. Without time conditioning the continuous-time
        # NELBO does not depend on the schedule, and its estimate over the number of masked
        # tokens (CountNelbo) has the same expectation with less variance and no truncation.
        self.bound = MDLMNelbo() if self.time_conditioned else CountNelbo()
        self.sampler_cls = MASKED_SAMPLERS.get(cfg.sampler or "ancestral")

    @property
    def input_vocab_size(self) -> int:
        return self.process.input_vocab_size

    def _score(self, objective, model, x0, xt, t):
        where = objective.positions(x0, xt, self.process)  # (B, L)
        logits = model(xt, t if self.time_conditioned else None, positions=where)  # (N, V)
        return objective(logits, x0, xt, t, self.process, where)  # (B,)

    def _corrupt(self, objective, x0, frac, generator, t_min):
        """x_t and t for uniform draws ``frac`` ∈ [0, 1) (B,): a time, or a masked count."""
        L = x0.shape[1]
        if objective.exact_count:
            k = (frac * L).long().clamp_max(L - 1) + 1  # uniform on {1, …, L}
            return self.process.corrupt_count(x0, k, generator), k.float() / L
        t = t_min + (1.0 - t_min) * frac
        return self.process.corrupt(x0, t, generator), t

    def loss(self, model, x0, generator):
        B, L = x0.shape
        frac = low_discrepancy(B, generator, x0.device)
        xt, t = self._corrupt(self.objective, x0, frac, generator, TRAIN_T_MIN)
        return self._score(self.objective, model, x0, xt, t).mean() / L

    def nll(self, model, x0, generator, mc_samples):
        B = x0.shape[0]
        # per sequence, K antithetic draws (u_b + k/K) mod 1
        u = torch.rand(B, generator=generator, device=x0.device)
        total = torch.zeros(B, device=x0.device, dtype=torch.float64)
        for j in range(mc_samples):
            xt, t = self._corrupt(self.bound, x0, (u + j / mc_samples) % 1.0, generator, EVAL_T_MIN)
            total += self._score(self.bound, model, x0, xt, t).double()
        scale = 1.0 if self.bound.exact_count else 1.0 - EVAL_T_MIN  # ∫_{t_min}^1 = (1 − t_min)·E_t
        return scale * total / mc_samples

    def sample(self, model, num, length, prompt, generator, steps, options):
        sampler = self.sampler_cls(steps, options)
        return sampler.sample(model, self.process, num, length, prompt, generator, self.time_conditioned)
