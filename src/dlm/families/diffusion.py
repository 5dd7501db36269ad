"""What every diffusion family shares: the training step over a global batch, the Monte
Carlo bound loop of ``dlm eval``, the time constants and the sampling entry. A diffusion
family states only its process, its objectives and samplers, the bound it reports, and
how it corrupts a batch (``corrupt``)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from dlm.batch import Batch
from dlm.families.base import Family, component_settings
from dlm.objectives import Corrupted, Objective, Scored
from dlm.processes import PROCESSES, Process, log_uniform_mix, low_discrepancy, mix_density
from dlm.samplers.guidance import Guided, hidden_tokens, hide_clean
from dlm.schedules import get_schedule

TRAIN_T_MIN = 1e-3  # MDLM's sampling_eps: keeps the 1/t weight of the log-linear schedule bounded
EVAL_T_MIN = 1e-5  # a bound estimated over t ∈ [EVAL_T_MIN, 1] omits ∫_0^{EVAL_T_MIN} (see each family)


class DiffusionFamily(Family):
    # a bound's (rows · L · V) logits evaluated at once in ``nll``; None: the whole batch
    eval_chunk: ClassVar[int | None] = None
    # the share of the bound's Monte Carlo times drawn log-uniformly when ``eval.log_t_share`` is unset
    default_log_t_share: ClassVar[float] = 0.0

    def __init__(self, cfg, vocab_size, eos_id):
        super().__init__(cfg, vocab_size, eos_id)
        self.process = self.make_process()
        self.bound: Objective = self.make_bound()

    def make_process(self) -> Process:
        """The process the run config names (``process:``, else the family's default), with its settings."""
        cls = PROCESSES.get(self.process_key(self.cfg))
        settings = None
        if self.processes is not None:
            _, settings = component_settings(self.processes, self.cfg.process, self.default_process, "process")
        return cls(self.vocab_size, get_schedule(self.cfg.schedule), settings)

    @classmethod
    def check_config(cls, cfg) -> None:
        get_schedule(cfg.schedule)  # an unknown schedule fails before any data is read

    # the registered objective (for the run's process) whose per-sequence nats ``dlm eval``
    # reports, whatever trained the model: an upper bound of −log p, integrated over t here
    bound_objective: ClassVar[str] = "nelbo"

    def make_bound(self) -> Objective:
        """The objective whose per-sequence nats ``dlm eval`` reports (an upper bound)."""
        return self.objectives.get(self.bound_objective)()

    @classmethod
    def preset(cls, name: str, label: str, process: str, **defaults) -> type["DiffusionFamily"]:
        """A family that is only a preset: a registered process, the default components and the
        bound, e.g. ``DiffusionFamily.preset("gidd", "mask + uniform hybrid", "hybrid",
        default_objective="elbo", bound_objective="elbo", default_time_conditioning=True)``.
        A family needs a class of its own only where its bound is estimated otherwise than as
        the time integral of ``bound_objective`` (MDLM over masked-token counts, USDM with its
        tail below ε, D3PM as a sum over its steps)."""
        attrs = {"name": name, "label": label, "process_choices": {process: process}, "default_process": process,
                 "__doc__": f"The '{name}' preset: process '{process}', {defaults}.", **defaults}
        return type(f"{name.title().replace('-', '')}Family", (cls,), attrs)

    @property
    def input_vocab_size(self) -> int:
        return self.process.input_vocab_size

    def corrupt(self, objective: Objective, batch: Batch, frac: torch.Tensor, generator, t_min: float) -> Corrupted:
        """x_t at times t = t_min + (1 − t_min)·frac for uniform draws ``frac`` (B,), target positions only."""
        t = self.process.time(frac, t_min)
        return Corrupted(batch.x0, self.process.corrupt(batch.x0, t, generator, batch.fixed), t, batch.target)

    def _score(self, objective: Objective, model, c: Corrupted, pad) -> Scored:
        where = objective.score_mask(c) & self.process.predicted(c.xt)  # (B, L); elsewhere nothing to score
        return self.score(objective, model, c, where, self.process, x=c.xt, t=c.t, pad=pad)

    def loss(self, model, batch, generator, rows=slice(None)):
        frac = low_discrepancy(batch.x0.shape[0], generator, batch.x0.device)
        c = self.corrupt(self.objective, batch, frac, generator, TRAIN_T_MIN)
        c = self.objective.draw(c, generator, self.process)
        rate = self.cfg.train.prompt_dropout
        if rate > 0 and batch.clean is not None:
            c = self.drop_prompts(c, batch, rate, generator)
        return self._score(self.objective, model, c.rows(rows), batch.rows(rows).attention_pad)

    def drop_prompts(self, c: Corrupted, batch: Batch, rate: float, generator) -> Corrupted:
        """Prompt dropout (unsupervised CFG's training, arXiv 2410.18514): each row of the
        global batch, with probability ``rate``, has its clean tokens hidden the way the
        unconditional pass of guidance hides them (``samplers.guidance.hide_clean``); they stay
        unscored. Drawn after the corruption, over the whole global batch, so the noise of
        every other position is that of ``rate`` = 0 and the ranks stay aligned. Objectives
        score inside ``target`` only, so a hidden prompt token is never scored."""
        x0 = batch.x0
        drop = torch.rand(x0.shape[0], generator=generator, device=x0.device) < rate  # (B,)
        hidden = hidden_tokens(self.process, x0.shape, generator, x0.device)
        hide = batch.clean & drop[:, None]
        return dataclasses.replace(c, xt=hide_clean(c.xt, hide, hidden))

    def eval_rows(self, batch: int, length: int, width: int | None = None) -> int:
        """Rows of a bound evaluated at once: ``eval_chunk`` elements of (rows, L, width), width
        the vocabulary unless given; the whole batch when the family sets no ``eval_chunk``."""
        if self.eval_chunk is None:
            return batch
        return max(1, self.eval_chunk // (length * (width or self.vocab_size)))

    def bound_nats(self, model, c: Corrupted, batch: Batch, width: int | None = None) -> torch.Tensor:
        """(B,) float64 nats of ``self.bound`` on ``c``, ``eval_rows`` rows at a time (a large
        vocabulary's (rows, L, V) terms need not fit at once)."""
        B, L = batch.x0.shape
        chunk = self.eval_rows(B, L, width)
        out = torch.empty(B, device=batch.x0.device, dtype=torch.float64)
        for r in range(0, B, chunk):
            sl = slice(r, r + chunk)
            out[sl] = self._score(self.bound, model, c.rows(sl), batch.rows(sl).attention_pad).nats.double()
        return out

    @classmethod
    def bound_draws_time(cls, cfg) -> bool:
        return True

    @property
    def bound_by_count(self) -> bool:
        """The bound is an expectation over masked-token counts, not a time integral."""
        return self.bound.by_count

    @property
    def log_t_share(self) -> float:
        """The share of the bound's times drawn log-uniformly (``eval.log_t_share``, or the
        family's default when unset); 0 for a bound estimated over masked-token counts."""
        if self.bound_by_count:
            return 0.0
        share = self.cfg.eval.log_t_share
        return self.default_log_t_share if share is None else share

    def bound_info(self) -> dict:
        return {} if self.bound_by_count else {"log_t_share": self.log_t_share}

    def nll(self, model, batch, generator, mc_samples):
        B = batch.x0.shape[0]
        # per sequence, K antithetic draws (u_b + k/K) mod 1
        u = torch.rand(B, generator=generator, device=batch.x0.device)
        total = torch.zeros(B, device=batch.x0.device, dtype=torch.float64)
        share = self.log_t_share
        for j in range(mc_samples):
            v = (u + j / mc_samples) % 1.0
            if self.bound_by_count:
                c = self.corrupt(self.bound, batch, v, generator, EVAL_T_MIN)
                total += self.bound_nats(model, c, batch)
                continue
            # ∫_{t_min}^1 f dt = E_q[f(t)/q(t)]: t from a uniform / log-uniform mixture (share 0: uniform,
            # weight 1 − t_min); the weight is taken at the time the corruption actually used
            t = log_uniform_mix(v, share, EVAL_T_MIN)
            c = self.corrupt(self.bound, batch, ((t - EVAL_T_MIN) / (1.0 - EVAL_T_MIN)).float(), generator, EVAL_T_MIN)
            total += self.bound_nats(model, c, batch) / mix_density(c.t.double(), share, EVAL_T_MIN)
        return total / mc_samples

    def sample(self, model, given, clean, generator, settings=None):
        sampler = self.sampler(settings)
        weight = sampler.settings.guidance  # every diffusion sampler's settings extend DiffusionSamplerSettings
        if weight > 0:  # every sampler gets classifier-free guidance by calling the wrapped model
            model = Guided(model, self.process, given, clean, weight, generator)
        return sampler.sample(model, self.process, given, clean, generator, self.time_conditioned)
