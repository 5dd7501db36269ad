"""Gaussian embedding diffusion (``--family gaussian``; VDM / Plaid / CDCD, docs/gaussian.md).

A diffusion family whose state is vectors: the process embeds tokens and noises the
embeddings, the network (a :class:`~dlm.backbones.vector_input.VectorInputTransformer`, time
conditioned) reads them through an input projection and predicts x0 as a distribution over
tokens. It needs a class of its own for two things only:

* ``build_model``: the backbone with the input projection of the process's embedding width;
* ``nll``: the VLB over t ∈ [0, 1] itself — prior KL + diffusion term + reconstruction, an
  unbiased Monte Carlo estimate with antithetic t. The end points bound the SNR, so the
  integrand is bounded at t = 0 and nothing is cut off below a t_min (the shared time loop
  integrates over [1e-5, 1] and weights by 1/(1 − 1e-5), which would leave the bound short).

and, with self-conditioning (``process.self_condition`` > 0), the first pass: ``corrupt``
draws the training rows that get it, ``_score`` runs it (no gradient) and hands its x̂ to
every pass the objective makes; ``nll`` gives it to every row, so the bound is that of the
two-pass predictor, a deterministic function of z_t.
"""

from __future__ import annotations

from functools import partial

import torch

from dlm.backbones.vector_input import VectorInputTransformer
from dlm.errors import DlmError
from dlm.families.base import component_settings
from dlm.families.diffusion import DiffusionFamily
from dlm.objectives import Corrupted
from dlm.objectives.gaussian import GaussianCorrupted, denoised, with_fields
from dlm.processes.gaussian import check_end_points


class GaussianDiffusion(DiffusionFamily):
    name = "gaussian"
    label = "Gaussian embedding diffusion"
    process_choices = {"gaussian": "gaussian"}
    default_process = "gaussian"
    default_objective = "vlb"
    bound_objective = "vlb"
    default_time_conditioning = True

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.schedule != "loglinear":  # the default, which this process does not read
            raise DlmError(f"schedule '{cfg.schedule}' is α_t of the discrete processes; gaussian's noise follows "
                           f"its log-SNR between process.gamma_min and process.gamma_max: drop it")
        _, settings = component_settings(cls.processes, cfg.process, cls.default_process, "process")
        check_end_points(settings)

    @classmethod
    def bound_draws_time(cls, cfg) -> bool:
        return False  # uniform t on [0, 1]: the integrand is bounded, no log-uniform share to choose

    @classmethod
    def bound_kind(cls, cfg) -> str:
        return "bound integrates a bounded integrand over uniform t ∈ [0, 1]"

    def bound_info(self) -> dict:
        s = self.process.settings
        return {"bound_name": "continuous-time VLB (VDM): prior KL + diffusion term + nearest-embedding "
                              "reconstruction, on −log p(tokens)",
                "gamma_min": s.gamma_min, "gamma_max": s.gamma_max, "embed_dim": s.embed_dim,
                "self_condition": s.self_condition}  # > 0: the bound of the two-pass predictor

    def build_model(self):
        self.process.reset_parameters()  # drawn with the network, under the same seed
        model = VectorInputTransformer.build(self.cfg.model, vocab_in=self.input_vocab_size, vocab_out=self.vocab_size,
                                             causal=False, cond_dim=self.cfg.model.cond_dim if self.time_conditioned
                                             else 0)
        model.set_input_width(self.process.embed_dim, self_condition=self.process.self_conditioned)
        model.add_module("process", self.process)
        return model

    def nll(self, model, batch, generator, mc_samples):
        B, device = batch.x0.shape[0], batch.x0.device
        u = torch.rand(B, generator=generator, device=device)
        total = torch.zeros(B, device=device, dtype=torch.float64)
        for j in range(mc_samples):
            t = (u + j / mc_samples) % 1.0  # antithetic draws, each uniform on [0, 1)
            c = Corrupted(batch.x0, self.process.corrupt(batch.x0, t, generator, batch.fixed), t, batch.target)
            c = self.bound.draw(c, generator, self.process)
            if self.process.self_conditioned:  # the bound of the two-pass predictor, every row
                c = with_fields(c, self_cond=torch.ones(B, dtype=torch.bool, device=device))
            total += self.bound_nats(model, c, batch)
        return total / mc_samples

    def corrupt(self, objective, batch, frac, generator, t_min):
        """The shared corruption (training's: ``nll`` corrupts on its own) and, for a
        self-conditioned network, the rows whose second pass reads the first pass's estimate:
        each with probability ``process.self_condition``, drawn over the whole global batch."""
        c = super().corrupt(objective, batch, frac, generator, t_min)
        if not self.process.self_conditioned:
            return c
        B, device = batch.x0.shape[0], batch.x0.device
        rows = torch.rand(B, generator=generator, device=device) < self.process.settings.self_condition
        return with_fields(c, self_cond=rows)

    def _score(self, objective, model, c, pad):
        rows = c.self_cond if isinstance(c, GaussianCorrupted) else None
        if rows is not None:  # the network (every pass the objective makes) reads the estimate
            model = partial(model, self_cond=self.self_condition_estimate(model, c, rows, pad))
        return super()._score(objective, model, c, pad)

    def self_condition_estimate(self, model, c: Corrupted, rows: torch.Tensor, pad) -> torch.Tensor:
        """(B, L, C) the self-conditioning input: x̂ = E_{p_θ(x0 | z_t)}[e(x0)] of a first pass that
        reads no estimate, without gradient, at the target positions of ``rows``; zero elsewhere
        (clean positions and padding, and the rows that train without one). A deterministic
        function of z_t, so the two passes are one predictor and the bound stays a bound."""
        out = torch.zeros(*c.x0.shape, self.process.embed_dim, device=c.x0.device)
        if not bool(rows.all()):  # the first pass on the chosen rows only
            rows = rows.nonzero(as_tuple=True)[0]
        where = c.target[rows]
        if not bool(where.any()):
            return out
        t = c.t[rows] if self.time_conditioned else None
        with torch.no_grad():
            logits = model(None, t, embeds=c.xt[rows], score_mask=where, pad=None if pad is None else pad[rows])
            est = out[rows]
            est[where] = denoised(logits, self.process).to(out.dtype)
            out[rows] = est
        return out
