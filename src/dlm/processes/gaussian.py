"""Gaussian diffusion on learned token embeddings (Plaid, Gulrajani & Hashimoto 2023, arXiv
2305.18619; VDM, Kingma et al. 2021, arXiv 2107.00630), in continuous time.

Each of the V data tokens has a learned embedding, normalised to unit length (Plaid's
``EmbeddingMatrix``): e(v) = w_v / ‖w_v‖ ∈ R^C, C = ``embed_dim`` (default 16, Plaid's).
Noise follows a variance-preserving Gaussian process under a log-SNR schedule with set end
points, in VDM's notation γ(t) = −log SNR(t), linear in t:

    γ(t) = γ_min + (γ_max − γ_min) t,    α_t² = sigmoid(−γ(t)),   σ_t² = sigmoid(γ(t)),
    q(z_t | x) = N(α_t e(x), σ_t² I)     per position independently,

so SNR(t) = α_t²/σ_t² = exp(−γ(t)) and α_t² + σ_t² = 1. The prior is p(z_1) = N(0, I). Clean
(given) positions and padding hold their clean embedding e(x) at every t.

Reverse step s < t (VDM eq. 33 ff.), with α_{t|s} = α_t/α_s, σ²_{t|s} = σ_t² − α²_{t|s} σ_s²:

    q(z_s | z_t, x) = N(μ, σ²_Q I),   μ = (α_{t|s} σ_s² / σ_t²) z_t + (α_s σ²_{t|s} / σ_t²) x,
                                      σ²_Q = σ²_{t|s} σ_s² / σ_t²,

with the clean embedding, or the network's estimate x̂ = E_{p_θ(x0 | z_t)}[e(x0)], as x.

The bound's end terms live here too (``prior_kl``, ``reconstruction``); the diffusion term in
``objectives/gaussian.py``. Derivations and choices: docs/gaussian.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dlm.batch import keep_fixed
from dlm.errors import DlmError
from dlm.processes.base import Process
from dlm.settings import setting


@dataclass
class GaussianSettings:
    embed_dim: int = setting(16, lo=1)  # C: width of the learned, unit-norm token embeddings (Plaid: 16)
    gamma_min: float = setting(-6.0, lo=-30, hi=30)  # γ(0) = −log SNR at t = 0, the least noise (VDM: −13.3)
    gamma_max: float = setting(6.0, lo=-30, hi=30)  # γ(1) = −log SNR at t = 1, the most noise (VDM: 5)
    # self-conditioning (Analog Bits / CDCD / Plaid): the share of training rows whose network also reads
    # the estimate x̂ of a first, no-gradient pass; 0: off (one pass everywhere, no second input projection)
    self_condition: float = setting(0.0, lo=0, hi=1, hi_open=True)


def check_end_points(settings: GaussianSettings) -> None:
    """γ_min < γ_max, or one line (the schedule must run from little noise at t = 0 to much at 1)."""
    if not settings.gamma_min < settings.gamma_max:
        raise DlmError(f"process.gamma_min ({settings.gamma_min:g}, −log SNR at t = 0) must be below "
                       f"process.gamma_max ({settings.gamma_max:g}, at t = 1): the end points are in the wrong order")


class GaussianProcess(Process):
    """The process of the module docstring. State: vectors z (B, L, C), float."""

    Settings = GaussianSettings
    vector_state = True  # the state is vectors (B, L, C), not ids

    def __init__(self, vocab_size, schedule, settings=None):
        super().__init__(vocab_size, schedule, settings)
        check_end_points(self.settings)
        self.embedding = nn.Parameter(torch.empty(vocab_size, self.settings.embed_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Plaid's initialisation: N(0, 1) entries (normalised per row when used), from the global
        RNG like the network's weights (the family draws them again when it builds the model)."""
        with torch.no_grad():
            self.embedding.normal_()

    @property
    def embed_dim(self) -> int:
        return self.settings.embed_dim

    @property
    def self_conditioned(self) -> bool:
        """Whether the network reads a self-conditioning estimate (``self_condition`` > 0)."""
        return self.settings.self_condition > 0

    def embeddings(self) -> torch.Tensor:
        """(V, C) the unit-norm embedding of every data token."""
        return self.embedding / self.embedding.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(…,) ids → (…, C) clean embeddings e(x)."""
        return F.embedding(x, self.embeddings())

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        """γ(t) = −log SNR(t), float64."""
        s = self.settings
        return s.gamma_min + (s.gamma_max - s.gamma_min) * t.double()

    @property
    def gamma_rate(self) -> float:
        """γ'(t) = γ_max − γ_min (so −SNR'(t) = γ'(t) SNR(t))."""
        return self.settings.gamma_max - self.settings.gamma_min

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t), float64: α² = sigmoid(−γ), σ² = sigmoid(γ)."""
        g = self.gamma(t)
        return torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.gamma(t))

    def corrupt(self, x0, t, generator, fixed=None):
        """z_t = α_t e(x0) + σ_t ε, ε ~ N(0, I) (B, L, C); ``fixed`` positions hold e(x0)."""
        e0 = self.embed(x0)  # (B, L, C)
        eps = torch.randn(e0.shape, generator=generator, device=e0.device)
        alpha, sigma = (v.to(e0.dtype)[:, None, None] for v in self.alpha_sigma(t))
        return keep_fixed(e0, alpha * e0 + sigma * eps, fixed)

    def moments(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean (B, L, C) and the standard deviation (B,) of q(z_t | x0), t (B,)."""
        alpha, sigma = self.alpha_sigma(t)
        e0 = self.embed(x0)
        return alpha.to(e0.dtype)[:, None, None] * e0, sigma

    def prior(self, shape, generator, device):
        """z_1 ~ N(0, I): (*shape, C)."""
        return torch.randn((*shape, self.embed_dim), generator=generator, device=device)

    def posterior(self, zt: torch.Tensor, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor):
        """(mean, std) of q(z_s | z_t, x) for s < t (scalars or broadcastable), ``x`` the clean
        embedding or x̂; mean in the dtype of ``zt``, std a float64 scalar / tensor."""
        alpha_t, sigma_t = self.alpha_sigma(t)
        alpha_s, sigma_s = self.alpha_sigma(s)
        a_ts = alpha_t / alpha_s
        var_ts = (sigma_t ** 2 - a_ts ** 2 * sigma_s ** 2).clamp_min(0.0)
        c_z = (a_ts * sigma_s ** 2 / sigma_t ** 2).to(zt.dtype)
        c_x = (alpha_s * var_ts / sigma_t ** 2).to(zt.dtype)
        return c_z * zt + c_x * x, (var_ts * sigma_s ** 2 / sigma_t ** 2).sqrt()

    def prior_kl(self, e0: torch.Tensor) -> torch.Tensor:
        """KL(q(z_1 | x) ‖ N(0, I)) per position, (…,) float64 for clean embeddings e0 (…, C):
        ½ (α_1² ‖e‖² + C (σ_1² − 1 − log σ_1²))."""
        a2 = torch.sigmoid(-self.gamma(torch.ones((), device=e0.device)))
        s2 = 1.0 - a2
        C = e0.shape[-1]
        return 0.5 * (a2 * e0.double().pow(2).sum(-1) + C * (s2 - 1.0 - torch.log(s2)))

    def reconstruction(self, x0: torch.Tensor, eps0: torch.Tensor) -> torch.Tensor:
        """−log p(x0 | z_0) per position, (N,) float32 (float64 embeddings stay float64), at
        z_0 = α_0 e(x0) + σ_0 ε0 (``eps0`` (N, C)): the nearest-embedding likelihood of VDM and
        Plaid, p(x = v | z_0) = softmax_v(−‖z_0 − α_0 e(v)‖² / 2σ_0²) — the exact posterior
        under a uniform prior over tokens, with no network call."""
        E = self.embeddings()  # (V, C)
        alpha, sigma = self.alpha_sigma(torch.zeros((), device=E.device))
        alpha, sigma = float(alpha), float(sigma)
        z0 = alpha * E[x0] + sigma * eps0.to(E.dtype)  # (N, C)
        with torch.autocast(E.device.type, enabled=False):  # float32 under a bf16 autocast: divided by σ_0²
            # −‖z − α e_v‖² / 2σ² up to a term that is the same for every v: (α z·e_v − α²‖e_v‖²/2) / σ²
            logits = (alpha * z0 @ E.T - 0.5 * alpha ** 2 * E.pow(2).sum(-1)) / sigma ** 2  # (N, V)
            return F.cross_entropy(logits, x0, reduction="none")
