"""Uniform-state diffusion language models (USDM): UDLM / Duo's forward process with the
objectives of SDDLM (Zhu et al. 2025, arXiv 2510.22926).

``--family usdm --objective nelbo | naive | sddlm | sddlm-v1 | sddlm-v2``. Whatever the
objective, ``dlm eval`` reports the exact continuous-time NELBO, so models trained with
different objectives compare on one bound: ∫_ε^1 by Monte Carlo over t (ε = EVAL_T_MIN =
1e-5) plus an upper bound on the ∫_0^ε that leaves out (``tail``). That piece is not
negligible by default: averaged over x_t the integrand grows like (V − 1)/V · log(1/t) as
t → 0 (the rare positions noise has changed cost ~1/t each), so ∫_0^ε is about
ε (log(1/ε) + 1) ≈ 1.2·10⁻⁴ nats per token for a good model, and without bound for a network
that denies its own input token (docs/uniform.md, "The NELBO").

Time conditioning is on by default (as in UDLM): unlike a masked sequence, a uniformly
corrupted one does not say how much of it is noise.
"""

from __future__ import annotations

import torch

from dlm.errors import DlmError
from dlm.families.diffusion import EVAL_T_MIN, DiffusionFamily
from dlm.objectives import Corrupted, per_sequence


class USDM(DiffusionFamily):
    name = "usdm"
    default_time_conditioning = True
    label = "uniform-state diffusion"
    process_choices = {"uniform": "uniform"}
    default_process = "uniform"
    default_objective = "nelbo"
    eval_chunk = 1 << 26  # the NELBO holds a few (N, V) float32 tensors: ≤ 2^26 elements at a time
    # a quarter of the bound's times log-uniform on [1e-5, 1]: the integrand grows like log(1/t)
    # near 0 (like 1/(Vp + t) for a network that denies its input); measured in
    # benchmarks/sddlm/time_draws.json: 24× less spread than uniform draws for such a network at
    # V = 18, 0.64–1.13× (mostly less) for well-behaved models at V = 18 to 4,096
    default_log_t_share = 0.25

    def set_carry(self, carry: float) -> None:
        """``dlm eval --carry λ``: report the bound of x_θ = (1 − λ) softmax + λ e_{x_t} (UniformNelbo)."""
        if not 0.0 <= carry < 1.0:
            raise DlmError(f"--carry must be in [0, 1) (the weight of the input token in x_θ), got {carry}")
        self.bound.carry = carry

    def bound_info(self) -> dict:
        carry = self.bound.carry
        return {**super().bound_info(),
                "x_theta": f"(1 − {carry:g}) softmax + {carry:g} e_x_t" if carry else "softmax", "carry": carry}

    def corrupt(self, objective, batch, frac, generator, t_min):
        t = t_min + (1.0 - t_min) * frac
        xt, noised = self.process.corrupt_with_noise(batch.x0, t, generator, batch.fixed)
        return Corrupted(batch.x0, xt, t, batch.target, noised)

    def nll(self, model, batch, generator, mc_samples):
        tail = self.tail(model, batch, generator)
        return super().nll(model, batch, generator, mc_samples) + sum(tail.values())

    @torch.no_grad()
    def tail(self, model, batch, generator) -> dict[str, torch.Tensor]:
        """An upper bound on ∫_0^ε E_{x_t} Σ_l f_t dt (ε = EVAL_T_MIN) in four parts, each (B,)
        float64 per sequence.

        On [0, ε) the network is queried at time ε (the model bounded is that one; a model
        without time conditioning is unaffected). Split x_t by the set C of positions that
        noise has changed (UniformNelbo.kept_tail / changed_tail / crowded_tail have the
        formulas):

        * ``changed``: changed positions, whatever C: ``changed_tail`` per target position,
          for any x_θ;
        * ``kept``: kept positions, C = ∅ (x_t = x0): Σ_l K(x_θ(x0^l | x0)), one network pass
          on x0;
        * ``next_to_change``: kept positions, C = {j}: n Σ_{l≠j} K₁(x_θ(x0^l | x0 with j
          changed)), one pass with one target position j per row changed to another token,
          both drawn uniformly: an unbiased estimate of an upper bound (it replaces a bound
          that assumes the worst of the network, (n − 1) ε per token: 1.3·10⁻³ nats at
          n = 128);
        * ``crowded``: kept positions, |C| ≥ 2: ``crowded_tail``, for any x_θ (≈ n³ ε²/4).
        """
        x0, target = batch.x0, batch.target
        B, L = x0.shape
        V, device = self.vocab_size, x0.device
        alpha_eps = float(self.process.schedule.alpha(torch.tensor(EVAL_T_MIN, dtype=torch.float64)))
        n = target.sum(-1)  # (B,)
        some = n > 0
        j = torch.multinomial(target.double() + (~some)[:, None], 1, generator=generator)[:, 0]
        shift = torch.randint(1, V, (B,), generator=generator, device=device)
        rows = torch.arange(B, device=device)
        changed = torch.zeros_like(target)
        changed[rows, j] = some
        x1 = torch.where(changed, (x0 + shift[:, None]) % V, x0)
        t = torch.full((B,), EVAL_T_MIN, device=device) if self.time_conditioned else None
        kept = self._kept_log_probs(model, x0, target, t, batch.attention_pad)
        near = self._kept_log_probs(model, x1, target & ~changed, t, batch.attention_pad)
        kept = per_sequence(self.bound.kept_tail(kept, alpha_eps, V), target)
        near = per_sequence(self.bound.kept_tail(near, alpha_eps, V, next_to_change=True), target & ~changed)
        return {"changed": n.double() * self.bound.changed_tail(V, alpha_eps), "kept": kept,
                "next_to_change": n.double() * near, "crowded": self.bound.crowded_tail(n, V, alpha_eps)}

    def _kept_log_probs(self, model, x, where, t, pad) -> torch.Tensor:
        """log x_θ(x^l | x) (N,) float64 at the N true positions of ``where`` (B, L), a chunk of
        rows at a time (a large vocabulary's (rows · L, V) logits need not fit at once)."""
        B, L = x.shape
        chunk = self.eval_rows(B, L)
        out = []
        for r in range(0, B, chunk):
            sl = slice(r, r + chunk)
            logits = model(x[sl], None if t is None else t[sl], score_mask=where[sl], pad=None if pad is None else pad[sl])
            # at least float32 (a bf16 network's logits are upcast), float64 kept where the network runs in it
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            out.append(logits.log_softmax(-1).gather(-1, x[sl][where[sl]][:, None])[:, 0].double())
        return torch.cat(out)
