"""Discrete-time diffusion over T steps (D3PM, Austin et al. 2021, arXiv 2107.03006).

A token moves at step i (from time (i−1)/T to i/T) by the transition matrix

    Q_i = α_i I + (1 − α_i) 1 πᵀ,     α_i = ᾱ_i / ᾱ_{i−1},  ᾱ_i = α(i/T),

with π = e_m ([MASK], **absorbing**) or π = 1/V (**uniform**), and α(t) the run's schedule
(the log-linear α(t) = 1 − t gives ᾱ_i = 1 − i/T, D3PM's absorbing schedule β_i = 1/(T − i + 1)).
Matrices of this form are closed under products, so every product is one of them:

    Q̄_i = Q_1 ⋯ Q_i = ᾱ_i I + (1 − ᾱ_i) 1 πᵀ,   Q_{t|s} = Q_{s+1} ⋯ Q_t  with  α_{t|s} = ᾱ_t / ᾱ_s,

so no |V|×|V| matrix is ever formed: a row of Q̄ is α·e_j + (1 − α)·π, a column
Q_{t|s}[·, k] = α_{t|s}·e_k + (1 − α_{t|s})·π_k·1 — O(V) per position at any vocabulary.

Reverse step in the x0-parameterisation (D3PM eq. 4): with x̃ = p̃_θ(x0 | x_t),

    p_θ(x_s | x_t) ∝ Q_{t|s}[x_s, x_t] · (x̃ Q̄_s)[x_s] = Σ_{x0} q(x_s, x_t | x0) x̃(x0),

and q(x_s | x_t, x0) is the same formula with x̃ = e_{x0}. At s = 0 (ᾱ_0 = 1) it is x̃
reweighted by the likelihood Q_{t|0}[·, x_t] of the current token: the reconstruction term
uses the same rule (D3PM's code uses x̃ itself there; ours keeps the carry-over of an
unmasked token exact, which an absorbing model otherwise has to learn).

The corruption q(x_t | x0) = row x0 of Q̄_t is that of the continuous-time processes at
t = i/T, so these classes reuse :class:`MaskedProcess` / :class:`UniformProcess` and add the
discrete-time algebra. ``steps`` = T is the process's setting (``process.steps``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dlm.settings import setting
from dlm.processes.masked import MaskedProcess
from dlm.processes.uniform import UniformProcess


@dataclass
class D3PMSettings:
    steps: int = setting(1000, lo=1, hi=1_000_000)  # T, the number of discrete diffusion steps


def step_grid(T: int, steps: int, device=None) -> torch.Tensor:
    """(steps + 1,) integer times T = i_0 > i_1 > … > i_steps = 0, as evenly spaced as integers
    allow (``steps`` ≤ T): the times the ancestral sampler visits with ``sampler.steps`` = steps,
    and the jumps whose terms the bound with ``eval.time_stride`` sums (:func:`strided_steps`)."""
    return torch.linspace(T, 0, steps + 1, device=device, dtype=torch.float64).round().long()


def strided_steps(T: int, stride: int) -> int:
    """The number of jumps ``eval.time_stride`` = K gives a T-step chain: T/K rounded to the
    nearest integer, halves up (at least 1). Where K divides T the grid is T, T − K, …, 0."""
    return max(1, (2 * T + stride) // (2 * stride))


def _log(x: torch.Tensor) -> torch.Tensor:
    """log x with log 0 = −inf (no warning, no NaN)."""
    return torch.where(x > 0, x.clamp_min(torch.finfo(x.dtype).tiny).log(), torch.full_like(x, -math.inf))


class DiscreteTime:
    """The discrete-time algebra shared by both D3PM processes (a mixin before the
    continuous-time process it reuses). States: the ``num_states`` ids the chain moves over."""

    Settings = D3PMSettings

    def __init__(self, vocab_size, schedule, settings: D3PMSettings | None = None):
        super().__init__(vocab_size, schedule, settings)
        self.steps = self.settings.steps

    def time(self, frac, t_min):
        """t = i/T for a step i = ⌊frac·T⌋ + 1 ∈ {1, …, T}; ``t_min`` is the continuous
        processes' and does not apply."""
        T = self.steps
        return ((frac * T).floor().clamp_max(T - 1) + 1) / T

    num_states: int

    def log_pi(self, device, dtype) -> torch.Tensor:
        """(S,) log π: where a token moves when it moves."""
        raise NotImplementedError

    def log_probs_x0(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, S) log p̃_θ(x0 | x_t) over the states from the network's (N, V) data logits."""
        return logits.log_softmax(-1)

    def log_transition_column(self, xt: torch.Tensor, alpha_ts: torch.Tensor, dtype) -> torch.Tensor:
        """(N, S) log Q_{t|s}[j, x_t] over j: α_{t|s}·δ(j = x_t) + (1 − α_{t|s})·π(x_t)."""
        a = alpha_ts.to(dtype)[:, None]  # (N, 1)
        pi_xt = self.log_pi(xt.device, dtype).exp()[xt][:, None]  # (N, 1)
        col = ((1.0 - a) * pi_xt).expand(len(xt), self.num_states).clone()
        col.scatter_add_(-1, xt[:, None], a)
        return _log(col)

    def log_marginal(self, log_x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """(N, S) log (x Q̄)(·) = log(ᾱ·x + (1 − ᾱ)·π) for (N, S) log-probabilities x."""
        a = alpha.to(log_x.dtype)[:, None]
        return torch.logaddexp(_log(a) + log_x, _log(1.0 - a) + self.log_pi(log_x.device, log_x.dtype))

    def reverse_log_probs(self, xt: torch.Tensor, log_x: torch.Tensor, alpha_t: torch.Tensor,
                          alpha_s: torch.Tensor) -> torch.Tensor:
        """(N, S) log of Σ_{x0} q(x_s | x_t, x0)·x(x0) in D3PM's form ∝ Q_{t|s}[·, x_t]·(x Q̄_s):
        the true posterior for x = e_{x0}, p_θ(x_s | x_t) for x = p̃_θ(x0 | x_t).
        ``xt`` (N,), ``log_x`` (N, S), ``alpha_t`` ≤ ``alpha_s`` (N,) with ``alpha_s`` > 0."""
        alpha_ts = alpha_t.to(log_x.dtype) / alpha_s.to(log_x.dtype)
        joint = self.log_transition_column(xt, alpha_ts, log_x.dtype) + self.log_marginal(log_x, alpha_s)
        return joint - joint.logsumexp(-1, keepdim=True)

    def one_hot_log(self, x0: torch.Tensor, dtype) -> torch.Tensor:
        """(N, S) log e_{x0}."""
        out = torch.full((len(x0), self.num_states), -math.inf, dtype=dtype, device=x0.device)
        return out.scatter_(-1, x0[:, None], 0.0)

    def posterior_kl(self, xt, x0, log_p_x0, alpha_t, alpha_s) -> torch.Tensor:
        """(N,) KL(q(x_s | x_t, x0) ‖ p_θ(x_s | x_t)) in nats (0·log 0 = 0); at s = 0 (ᾱ_s = 1)
        it is the reconstruction term −log p_θ(x0 | x_t)."""
        dtype = log_p_x0.dtype
        log_q = self.reverse_log_probs(xt, self.one_hot_log(x0, dtype), alpha_t, alpha_s)
        log_p = self.reverse_log_probs(xt, log_p_x0, alpha_t, alpha_s)
        q = log_q.exp()
        terms = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q))
        return terms.sum(-1)

    def prior_kl(self) -> float:
        """KL(q(x_T | x0) ‖ p(x_T)) per token, p(x_T) = π (the same for every x0): 0 for every
        shipped schedule (α(1) = 0 exactly); +inf for an absorbing chain that ends with
        tokens unmasked."""
        alpha_T = self.schedule.alpha(torch.ones(1, dtype=torch.float64))
        log_q = self.log_marginal(self.one_hot_log(torch.zeros(1, dtype=torch.long), torch.float64), alpha_T)
        log_pi = self.log_pi("cpu", torch.float64)
        q = log_q.exp()
        return float(torch.where(q > 0, q * (log_q - log_pi), torch.zeros_like(q)).sum())


class AbsorbingD3PM(DiscreteTime, MaskedProcess):
    """D3PM-absorbing: a token jumps to [MASK] (id V) and stays there. Only masked positions
    carry a loss; an unmasked one is carried over exactly by the reverse step."""

    @property
    def num_states(self) -> int:
        return self.vocab_size + 1

    def log_pi(self, device, dtype):
        out = torch.full((self.num_states,), -math.inf, dtype=dtype, device=device)
        out[self.mask_id] = 0.0
        return out

    def predicted(self, xt):
        return xt == self.mask_id

    def posterior_kl(self, xt, x0, log_p_x0, alpha_t, alpha_s):
        """Closed form, O(1) per position after the softmax: at a masked x_t both q and p_θ
        keep [MASK] with probability 1 − w and otherwise unmask, q to x0 and p_θ to a draw
        from x̃, with w = (ᾱ_s − ᾱ_t)/(1 − ᾱ_t); so KL = −w·log x̃(x0) (w = 1 at s = 0, the
        reconstruction term). An unmasked x_t is carried over by both: 0. The generic
        (N, S) computation (``DiscreteTime.posterior_kl``) gives the same, as the tests check."""
        dtype = log_p_x0.dtype
        a_t, a_s = alpha_t.to(dtype), alpha_s.to(dtype)
        w = (a_s - a_t) / (1.0 - a_t).clamp_min(torch.finfo(dtype).tiny)
        own = log_p_x0.gather(-1, x0[:, None])[:, 0]
        return torch.where(xt == self.mask_id, -w * own, torch.zeros_like(own))

    def log_probs_x0(self, logits):
        # the network never predicts [MASK]: x0 has no mass there
        return torch.nn.functional.pad(logits.log_softmax(-1), (0, 1), value=-math.inf)


class UniformD3PM(DiscreteTime, UniformProcess):
    """D3PM-uniform: a token jumps to a uniformly drawn token (possibly itself)."""

    @property
    def num_states(self) -> int:
        return self.vocab_size

    def log_pi(self, device, dtype):
        return torch.full((self.num_states,), -math.log(self.vocab_size), dtype=dtype, device=device)

    def posterior_kl(self, xt, x0, log_p_x0, alpha_t, alpha_s):
        """Closed form with one (N, V) pass. With a = α_{t|s}, b = ᾱ_s, the column
        c_j = a·δ(j = x_t) + (1 − a)/V and the marginals m^q_j = b·δ(j = x0) + (1 − b)/V,
        m^p_j = b·x̃_j + (1 − b)/V, q ∝ c·m^q and p_θ ∝ c·m^p share c, so

            KL = Σ_j q_j log m^q_j − Σ_j q_j log m^p_j + log Z_p − log Z_q,
            Z = Σ_j c_j m_j = a·m_{x_t} + (1 − a)/V,

        and q = [(1−a)(1−b)/V² + (1−a)b/V·δ(j=x0) + a(1−b)/V·δ(j=x_t) + ab·δ(j=x0)δ(j=x_t)] / Z_q
        puts the same mass on every j but x0 and x_t, so Σ_j q_j f_j needs Σ_j f_j and two
        entries of f. The generic (N, S) computation gives the same (tested)."""
        dtype = log_p_x0.dtype
        V = self.vocab_size
        a = (alpha_t.to(dtype) / alpha_s.to(dtype))
        b = alpha_s.to(dtype)
        log_mp = self.log_marginal(log_p_x0, b)  # (N, V) log m^p
        same = (x0 == xt).to(dtype)

        def at(f, idx):
            return f.gather(-1, idx[:, None])[:, 0]

        mq_xt = b * same + (1 - b) / V
        z_q = a * mq_xt + (1 - a) / V
        z_p = a * at(log_mp, xt).exp() + (1 - a) / V
        base = (1 - a) * (1 - b) / V**2  # q_j·Z_q at j ∉ {x0, x_t}
        q_x0 = (base + (1 - a) * b / V + a * (1 - b) / V * same + a * b * same) / z_q
        # Σ_j q_j log m^p_j
        cross = (base * log_mp.sum(-1) + (1 - a) * b / V * at(log_mp, x0) + a * (1 - b) / V * at(log_mp, xt)
                 + a * b * same * at(log_mp, x0)) / z_q
        # Σ_j q_j log m^q_j: m^q is (1 − b)/V except b + (1 − b)/V at x0; at b = 1, q = δ_x0 and it is 0
        rest = torch.where(b < 1, (1 - q_x0) * torch.log(((1 - b) / V).clamp_min(torch.finfo(dtype).tiny)),
                           torch.zeros_like(b))
        own = q_x0 * torch.log(b + (1 - b) / V)
        return own + rest - cross + torch.log(z_p) - torch.log(z_q)
