"""Ancestral sampling of the mask + uniform hybrid (GIDD), and GIDD's self-correction pass.

From x_1 = all [MASK] (clean positions hold their given tokens), for steps t = 1 → 0 on a
uniform grid of T steps, every generated position draws z_s ~ q(z_s | z_t, x_θ), the
posterior of ``HybridProcess`` with the network's x_θ = p_θ(x0 | z_t) (after temperature /
top-k / top-p) in place of x0. A decoded token is not final: where p_u > 0 it may be
re-masked, replaced by noise or redrawn from x_θ at any later step, as the posterior says.

The posterior is drawn as the mixture it is, for z_t = i,

    q(z_s = k | i, x_θ) ∝ α_{t|s} q_s(i) δ_{ik} + b_{t|s}(i) q_s(k),   q_s = α_s x_θ + b_s(y)·1 + b_s(m) e_m,

i.e. keep i (weight α_{t|s} q_s(i)), or draw from q_s — from x_θ (b_{t|s}(i) α_s), a uniform
data token (b_{t|s}(i) V b_s(y)) or [MASK] (b_{t|s}(i) b_s(m)) — with one float64 uniform per
position per step. At a [MASK] q_s(m) = b_s(m) does not involve x_θ: whether it stays masked
or takes noise is decided without the network, which runs only where a [MASK] takes a token
from x_θ and at the data tokens (whose keep weight involves x_θ(i); none when p_u = 0, where
this is masked ancestral sampling with its per-row cache). The last step (s = 0: α_s = 1,
b_s = 0) draws every [MASK] from x_θ: no [MASK] is left.

**Self-correction** (the ``self-correct`` sampler: the ancestral one, then GIDD's
``correction_step`` ``correction_steps`` times): at a small time t₀ (``correction_t``) the network
scores the finished sequence; at every generated position a token z is drawn from
softmax(logits / ``correction_temperature``), and of the positions where z differs from the
current token the ``correction_tokens`` with the highest p(z) per row take it. A row stops when
nothing would change, or when the share of its tokens that agree with the network's argmax
has not improved for more than ``correction_patience`` iterations (that proposal is dropped).
Clean positions never change. ``nfe`` counts every network call in full-batch equivalents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm.processes.hybrid import HybridProcess
from dlm.samplers.base import (DiffusionSamplerSettings, Sampler, SamplerSettings, filter_logits, sample_categorical,
                               start_from_prior)
from dlm.samplers.masked_ancestral import NetworkCalls, evaluate_rows
from dlm.settings import setting


@dataclass
class SelfCorrectSettings(DiffusionSamplerSettings):
    correction_steps: int = setting(128, lo=1)  # GIDD's self_correction.yaml: 128 iterations at temperature 0.1
    correction_temperature: float = setting(0.1, lo=0)  # of the tokens proposed by a correction (0: the argmax)
    correction_t: float = setting(0.01, lo=0, hi=1, lo_open=True)  # the time the network is told while correcting
    correction_tokens: int = setting(1, lo=1)  # positions a correction changes per row and iteration, at most
    correction_patience: int = setting(32, lo=0)  # iterations without a better agreement before a row stops


class HybridAncestralSampler(Sampler):
    name = "ancestral"
    Settings = DiffusionSamplerSettings
    chunk = 4096  # rows of float64 (row, V) buffers at a time

    def _own_probability(self, logits, ids):
        """x_θ at ``ids`` (N,) float64 after filtering, ``chunk`` rows at a time."""
        out = torch.empty(len(ids), dtype=torch.float64, device=ids.device)
        for i in range(0, len(ids), self.chunk):
            sl = slice(i, i + self.chunk)
            out[sl] = filter_logits(logits[sl], self.options).softmax(-1).gather(-1, ids[sl, None])[:, 0]
        return out

    def _from_x_theta(self, logits, opts, generator):
        """Tokens drawn from the filtered logits (N,), and their probabilities (N,) float64."""
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        probs = torch.empty(logits.shape[0], dtype=torch.float64, device=logits.device)
        for i in range(0, logits.shape[0], self.chunk):
            filtered = filter_logits(logits[i : i + self.chunk], opts)
            tokens[i : i + self.chunk] = drawn = sample_categorical(filtered, generator)
            probs[i : i + self.chunk] = filtered.log_softmax(-1).gather(-1, drawn[:, None])[:, 0].exp()
        return tokens, probs

    def _step(self, model, process: HybridProcess, x, free, t, s, generator, t_batch, pad, counter):
        """One reverse step t → s at the generated positions ``free`` (B, L): the new x."""
        a_ts, bts_m, bts_u, parts = process.step_parts(t, s)
        a_ts, bts_m, bts_u = float(a_ts), float(bts_m), float(bts_u)
        alpha_s, bm_s, bu_s = map(float, parts)
        V, device = process.vocab_size, x.device
        masked = (x == process.mask_id) & free
        data = free & ~masked & process.predicted(x)  # data tokens whose step depends on x_θ (none at p_u = 0)
        u = torch.rand(x.shape, generator=generator, device=device, dtype=torch.float64)
        z_m = a_ts * bm_s + bts_m  # the normaliser at a [MASK]: q_t(m | x_θ) up to the common factor
        to_x = 2.0 if float(s) == 0 else bts_m * alpha_s / z_m  # the last step decodes every [MASK]
        cut_x = torch.full(x.shape, to_x, dtype=torch.float64, device=device)  # → from x_θ
        cut_u = cut_x + bts_m * V * bu_s / z_m  # → a uniform token; beyond: stays [MASK]
        need = (masked & (u < cut_x)) | data
        logits = evaluate_rows(model, x, need, t_batch, pad, counter) if need.any() else None
        cut_m = cut_u.clone()  # data tokens: beyond cut_m the token is kept
        if bool(data.any()):
            own = self._own_probability(logits[data[need]], x[data])  # x_θ(i) at the data tokens
            z_i = a_ts * (alpha_s * own + bu_s) + bts_u
            cut_x[data] = bts_u * alpha_s / z_i
            cut_u[data] = cut_x[data] + bts_u * V * bu_s / z_i
            cut_m[data] = cut_u[data] + bts_u * bm_s / z_i
        take_x = need & (u < cut_x)
        take_u = (masked | data) & (u >= cut_x) & (u < cut_u)
        take_m = data & (u >= cut_u) & (u < cut_m)
        x = x.clone()
        if bool(take_x.any()):
            x[take_x] = self._from_x_theta(logits[take_x[need]], self.options, generator)[0]
        n_u = int(take_u.sum())
        if n_u:
            x[take_u] = torch.randint(0, V, (n_u,), generator=generator, device=device)
        x[take_m] = process.mask_id
        return x

    @torch.no_grad()
    def sample(self, model, process: HybridProcess, given, clean, generator, time_conditioned: bool, pad=None):
        """(B, L) tokens and the network evaluations (full-batch equivalents); ``clean``
        positions are kept as in ``given``."""
        steps = self.settings.steps
        num, device = given.shape[0], given.device
        x, fixed = start_from_prior(process, given, clean, pad, generator)  # (B, L)
        free = ~fixed
        times = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
        counter = NetworkCalls(num)
        self.record(x)
        for i in range(steps):
            t_batch = torch.full((num,), float(times[i]), device=device) if time_conditioned else None
            x = self._step(model, process, x, free, times[i], times[i + 1], generator, t_batch, pad, counter)
            self.record(x)
        x = self.finish(model, x, free, generator, time_conditioned, pad, counter)
        self.stats = counter.as_dict()
        return x, counter.nfe

    def finish(self, model, x, free, generator, time_conditioned, pad, counter):
        """What follows the last step (nothing here; the self-correction pass in ``self-correct``)."""
        return x


class SelfCorrectSampler(HybridAncestralSampler):
    """The ancestral sampler followed by GIDD's self-correction pass (128 iterations by default)."""

    name = "self-correct"
    Settings = SelfCorrectSettings

    def finish(self, model, x, free, generator, time_conditioned, pad, counter):
        """GIDD's self-correction pass (module docstring) on the generated positions ``free``."""
        st = self.settings
        num, device = x.shape[0], x.device
        opts = SamplerSettings(temperature=st.correction_temperature, top_k=0, top_p=1.0)
        t_batch = torch.full((num,), st.correction_t, device=device) if time_conditioned else None
        active = free.any(-1)
        best = torch.full((num,), -1.0, dtype=torch.float64, device=device)
        waited = torch.zeros(num, dtype=torch.long, device=device)
        k = min(st.correction_tokens, x.shape[1])
        for _ in range(st.correction_steps):
            if not bool(active.any()):
                break
            where = free & active[:, None]
            logits = evaluate_rows(model, x, where, t_batch, pad, counter, rows=active)
            proposal = x.clone()
            proposal[where], p_z = self._from_x_theta(logits, opts, generator)
            score = torch.full(x.shape, -1.0, dtype=torch.float64, device=device)
            score[where] = torch.where(proposal[where] != x[where], p_z, 0.0)
            top = score.topk(k, dim=-1).indices  # (B, k)
            change = torch.zeros_like(free).scatter_(-1, top, True) & (score > 0)
            new = torch.where(change, proposal, x)
            agree = torch.zeros(x.shape, dtype=torch.float64, device=device)
            agree[where] = (new[where] == logits.argmax(-1)).double()
            acc = agree.sum(-1) / where.sum(-1).clamp_min(1)
            better = acc > best
            best = torch.where(better & active, acc, best)
            waited = torch.where(better, 0, waited + 1)
            go = active & change.any(-1) & (waited <= st.correction_patience)
            x = torch.where(go[:, None], new, x)
            active = go
            self.record(x)
        return x
