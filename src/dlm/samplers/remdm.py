"""ReMDM: remasking sampling of masked diffusion (Wang et al. 2025, arXiv 2503.00307).

MDLM's sampler never revisits a token once unmasked. ReMDM samples from a family of
posteriors with the same marginals q(z_t | x) in which a decoded token is *remasked* with
probability σ_t, 0 ≤ σ_t ≤ σ_t^max = min(1, (1 − α_s)/α_t) (paper eq. 5):

    z_t ≠ m:  q_σ(z_s | z_t, x) = Cat(z_s; (1 − σ_t) x + σ_t m)
    z_t = m:  q_σ(z_s | z_t, x) = Cat(z_s; (α_s − (1 − σ_t) α_t)/(1 − α_t) · x
                                         + (1 − α_s − σ_t α_t)/(1 − α_t) · m),

with x = p_θ(x0 | z_t) (after temperature / top-k / top-p) where z_t = m and x = z_t (the
token itself) where it is decoded. σ_t = 0 is MDLM's posterior.

σ_t schedules (``schedule``; η = ``eta`` ∈ [0, 1]):

  * ``cap``:     σ_t = min(η, (1 − α_s)/α_t)                          (ReMDM-cap)
  * ``rescale``: σ_t = η · σ_t^max                                   (ReMDM-rescale)
  * ``conf``:    σ_t^ℓ = η · softmax_ℓ(−ψ^ℓ) · σ_t^max over the decoded positions ℓ of a row,
                 ψ^ℓ the probability the token had when it was drawn; masked positions get
                 σ = 0 (ReMDM-conf; the paper's is η = 1).

``loop`` (ReMDM-loop): α(t) is replaced by the piecewise-linear schedule of the paper's code
— α rises linearly from 0 at t = 1 to ``alpha_on`` at ``t_on``; stays at ``alpha_on`` from
``t_on`` to ``t_off`` (the loop phase); rises linearly to 1 at t = 0. Steps whose whole
interval [s, t] lies in the loop phase sample the ReMDM posterior with α_t = α_s =
``alpha_on`` (decoded tokens remask with σ, masks unmask with σ α/(1 − α): the expected
number of masks stays constant); every other step is an MDLM step (σ = 0). On the uniform
grid of ``steps`` steps the loop phase takes a fraction t_on − t_off of them.

Every step draws one float64 uniform u per position (row-major), then one Gumbel draw per
unmasking position: a masked position unmasks when u < its unmask probability, a decoded one
remasks when u < σ. With η = 0 these are exactly the draws of the ancestral sampler
(``masked_ancestral``), so the tokens are the same under the same seed. Clean (and padded)
positions are never remasked. The last step (s = 0) unmasks every remaining mask and remasks
nothing, so the output holds no [MASK]. The network runs, as in the ancestral sampler's
per-row cache, only on the rows that unmask something at a step and only where they
unmask; ``nfe`` is in full-batch equivalents (``self.stats`` has the calls).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm.settings import setting
from dlm.errors import DlmError
from dlm.processes.masked import MaskedProcess
from dlm.samplers.base import DiffusionSamplerSettings, Sampler, filter_logits, sample_categorical, start_from_prior
from dlm.samplers.masked_ancestral import NetworkCalls, evaluate_rows, time_of_alpha

SCHEDULES = ("cap", "rescale", "conf")


@dataclass
class ReMDMSettings(DiffusionSamplerSettings):
    schedule: str = setting("cap", choices=SCHEDULES)  # σ_t: cap | rescale | conf
    eta: float = setting(0.02, lo=0, hi=1)  # η: 0 is MDLM's ancestral sampler, exactly
    loop: bool = setting(False)  # ReMDM-loop: remask at constant α between t_on and t_off, MDLM elsewhere
    t_on: float = setting(0.55, lo=0, hi=1, lo_open=True, hi_open=True)  # loop: the loop phase starts at t_on …
    t_off: float = setting(0.05, lo=0, hi=1, hi_open=True)  # … and ends at t_off < t_on
    alpha_on: float = setting(0.9, lo=0, hi=1, lo_open=True, hi_open=True)  # loop: α held in the loop phase
    cache: bool = setting(True)  # run the network only on the rows that unmask at a step


def loop_alpha(t: torch.Tensor, t_on: float, t_off: float, alpha_on: float) -> torch.Tensor:
    """ReMDM-loop's α(t) (float64): (1 − t)·α_on/(1 − t_on) above t_on, α_on in [t_off, t_on],
    1 − t·(1 − α_on)/t_off below t_off."""
    t = t.double()
    high = (1.0 - t) * alpha_on / (1.0 - t_on)
    low = 1.0 - t * (1.0 - alpha_on) / t_off if t_off > 0 else torch.ones_like(t)
    return torch.where(t > t_on, high, torch.where(t < t_off, low, torch.full_like(t, alpha_on)))


def sigma_max(alpha_t: float, alpha_s: float) -> float:
    """min(1, (1 − α_s)/α_t): the largest remasking probability that keeps the marginals (1 at α_t = 0)."""
    return 1.0 if alpha_t <= 0 else min(1.0, (1.0 - alpha_s) / alpha_t)


class ReMDMSampler(Sampler):
    name = "remdm"
    Settings = ReMDMSettings

    def _check(self):
        st = self.settings
        if st.loop and not st.t_off < st.t_on:
            raise DlmError(f"sampler.t_off must be < sampler.t_on, got t_off={st.t_off}, t_on={st.t_on}")

    def step_probabilities(self, decoded, conf, alpha_t: torch.Tensor, alpha_s: torch.Tensor, remask: bool,
                           last: bool):
        """(unmask probability of each masked position, remask probability σ of each decoded
        position), (B, L) float64, for one step t → s with α_t ≤ α_s (float64 scalars).
        ``decoded`` (B, L): generated positions holding a token; ``conf`` (B, L): their ψ."""
        st = self.settings
        zeros = torch.zeros(decoded.shape, dtype=torch.float64, device=decoded.device)
        if last:  # s = 0: every mask unmasks, nothing is remasked
            return torch.ones_like(zeros), zeros
        smax = sigma_max(float(alpha_t), float(alpha_s))
        sigma_mask = 0.0  # σ of the masked positions (scalar: the same for every position)
        if not remask or st.eta == 0:
            sigma_dec = zeros
        elif st.schedule == "cap":
            sigma_mask = min(st.eta, smax)
            sigma_dec = zeros + sigma_mask
        elif st.schedule == "rescale":
            sigma_mask = st.eta * smax
            sigma_dec = zeros + sigma_mask
        else:  # conf: softmax of −ψ over each row's decoded positions; masked positions keep σ = 0
            score = torch.where(decoded, -conf, torch.full_like(conf, float("-inf")))
            weight = torch.where(decoded.any(-1, keepdim=True), score.softmax(-1), zeros).nan_to_num(0.0)
            sigma_dec = st.eta * smax * weight
        # (α_s − (1 − σ) α_t)/(1 − α_t); at σ = 0 exactly MaskedProcess.unmask_probability
        p_unmask = ((alpha_s - (1.0 - sigma_mask) * alpha_t) / (1.0 - alpha_t).clamp_min(1e-12)).clamp(0.0, 1.0)
        return (zeros + p_unmask), torch.where(decoded, sigma_dec, zeros)

    def step(self, model, process: MaskedProcess, x, fixed, conf, alpha_t, alpha_s, t_batch, remask: bool,
             last: bool, generator, counter: NetworkCalls, pad=None):
        """x_s (B, L) drawn from the ReMDM posterior q_σ(x_s | x_t = ``x``, x_θ) for α_t ≤ α_s
        (float64 scalars); ``remask`` False: σ = 0 (an MDLM step). Updates ``conf`` in place."""
        masked = x == process.mask_id
        decoded = ~masked & ~fixed
        if not self.settings.cache and masked.any():  # the reference: the whole batch at every step with masks
            full = evaluate_rows(model, x, masked, t_batch, pad, counter, rows=torch.ones_like(masked[:, 0]))
        p_unmask, sigma = self.step_probabilities(decoded, conf, alpha_t, alpha_s, remask=remask, last=last)
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
        unmask = masked & (u < p_unmask)
        remasked = decoded & (u < sigma)
        if not (unmask.any() or remasked.any()):
            return x
        x_new = x.clone()
        if unmask.any():
            if self.settings.cache:  # only the rows that unmask now, only where they unmask
                logits = evaluate_rows(model, x, unmask, t_batch, pad, counter)
            else:
                logits = full[unmask[masked]]
            filtered = filter_logits(logits, self.options)
            drawn = sample_categorical(filtered, generator)
            x_new[unmask] = drawn
            if self.settings.schedule == "conf":  # ψ: the probability the drawn token had (after filtering)
                conf[unmask] = filtered.softmax(-1).gather(-1, drawn[:, None])[:, 0]
        x_new[remasked] = process.mask_id
        return x_new

    @torch.no_grad()
    def sample(self, model, process: MaskedProcess, given, clean, generator, time_conditioned: bool, pad=None):
        """(B, L) tokens and the network evaluations (full-batch equivalents); ``clean``
        positions are kept as in ``given`` and never remasked."""
        self._check()
        st = self.settings
        steps, num, device = st.steps, given.shape[0], given.device
        x, fixed = start_from_prior(process, given, clean, pad, generator)  # (B, L)
        times = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
        conf = torch.zeros(x.shape, dtype=torch.float64, device=device)  # ψ of the decoded positions
        counter = NetworkCalls(num)
        self.record(x)
        for i in range(steps):
            t, s = times[i], times[i + 1]
            if st.loop:
                a_t = loop_alpha(t, st.t_on, st.t_off, st.alpha_on)
                a_s = loop_alpha(s, st.t_on, st.t_off, st.alpha_on)
                in_loop = float(t) <= st.t_on and float(s) >= st.t_off
                t_model = time_of_alpha(process.schedule, a_t) if time_conditioned else t
            else:  # the process's own schedule, computed exactly as the ancestral sampler does
                a_t, a_s = process.schedule.alpha(t), process.schedule.alpha(s)
                in_loop, t_model = True, t
            t_batch = torch.full((num,), float(t_model), device=device) if time_conditioned else None
            x = self.step(model, process, x, fixed, conf, a_t, a_s, t_batch, in_loop, i == steps - 1, generator,
                          counter, pad)
            self.record(x)
        self.stats = counter.as_dict()
        return x, counter.nfe
