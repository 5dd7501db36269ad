"""The two distillation methods, as objectives whose ``score`` calls a frozen teacher next to
the student (the :class:`~dlm.objectives.base.Predictor`), so the ordinary training loop
trains the student.

**SDTT** (Deschenaux & Gulcehre 2024, arXiv 2410.21035), masked diffusion. In round r the
teacher samples with T_r = start_steps / 2^r ancestral steps of size dt = 1/T_r and the
student learns to take one step of 2·dt in their place. A training row: x0 from the data, t
on the student's grid {k / (T_r/2)}, z_t ~ q(z_t | x0). The teacher takes two ancestral
steps t → t − dt → t − 2dt: its x0-prediction p1 = x_θ(z_t), then every masked position
unmasks with probability (α_{t−dt} − α_t)/(1 − α_t), drawing its token from p1, giving
z_{t−dt}, and p2 = x_θ(z_{t−dt}) at the positions still masked. The target of a masked
position is p1 where it unmasked at the first step and p2 elsewhere (what the teacher's two
steps decode it from); the student's x_ν(z_t) is matched to it with ``distill.divergence``
at every masked position. After a round the student becomes the next round's teacher.

**DCD** (Duo, Sahoo et al. 2025, arXiv 2506.10892 §4), uniform-state diffusion. Uniform-state
noise is the argmax of Gaussian diffusion on one-hot vectors: x_t = argmax(α̃_t e_x0 + σ̃_t ε)
has the marginal α_t e_x0 + (1 − α_t)/V with α_t = T(α̃_t) (:func:`gaussian_margin` inverts
T). One ε gives the deterministic trajectory of the Gaussian flow, so x_t and x_s (s = t −
dt) are coupled; the student at (x_t, t) is matched to the teacher at (x_s, s) at every
generated position. In round r, dt = 2^r / start_steps (Duo doubles dt every round) and the
teacher is the student of the round before.
"""

from __future__ import annotations

import math

import torch

from dlm.distill.settings import DistillConfig
from dlm.objectives import Corrupted, Objective, Scored
from dlm.objectives.base import per_sequence, token_count
from dlm.registry import Registry

DIVERGENCES = Registry("distillation divergence")


@DIVERGENCES.register("kl-bwd")
def kl_backward(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(student ‖ teacher) = Σ_v p (log p − log q) per row, (N, V) log-probabilities → (N,)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@DIVERGENCES.register("kl-fwd")
def kl_forward(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) = Σ_v q (log q − log p)."""
    return (log_q.exp() * (log_q - log_p)).sum(-1)


@DIVERGENCES.register("mse")
def mse(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Mean over the vocabulary of (log p − log q)²."""
    return (log_p - log_q).pow(2).mean(-1)


@DIVERGENCES.register("tvd")
def tvd(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Total variation ½ Σ_v |p − q|."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def inverse_cdf(log_probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of (N, V) log-probabilities from (N,) float64 uniforms."""
    cdf = log_probs.double().exp().cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_max(log_probs.shape[-1] - 1)[:, 0]


_MARGINS: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _margin_table(vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, P(argmax(m e_x + ε) = x)) on a grid of m ∈ [0, 15], once per vocabulary and device.

    P(argmax = x) = E_z[Φ(z + m)^(V−1)], z ~ N(0, 1), by quadrature on [−12, 12]: 1/V at m = 0,
    increasing to 1 (to double precision by m = 15 at any vocabulary dlm reads)."""
    key = (vocab, str(device))
    if key not in _MARGINS:
        m = torch.linspace(0.0, 15.0, 3001, dtype=torch.float64)
        z = torch.linspace(-12.0, 12.0, 4001, dtype=torch.float64)
        w = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) * (z[1] - z[0])
        p = (w * torch.exp((vocab - 1) * torch.special.log_ndtr(z + m[:, None]))).sum(-1)
        _MARGINS[key] = (m.to(device), torch.cummax(p, 0).values.to(device))
    return _MARGINS[key]


def gaussian_margin(alpha: torch.Tensor, vocab: int) -> torch.Tensor:
    """m = α̃/σ̃ such that P(argmax(m e_x + ε) = x) = α + (1 − α)/V for ε ~ N(0, I_V): Duo's map
    between the discrete α_t and the Gaussian signal level, inverted by linear interpolation in
    :func:`_margin_table` (float64, elementwise)."""
    m, p = _margin_table(vocab, alpha.device)
    want = alpha.double() + (1.0 - alpha.double()) / vocab
    i = torch.searchsorted(p, want).clamp(1, len(p) - 1)
    lo, hi = p[i - 1], p[i]
    frac = ((want - lo) / (hi - lo).clamp_min(1e-300)).clamp(0.0, 1.0)
    return m[i - 1] + frac * (m[i] - m[i - 1])


def duality_pair(x0: torch.Tensor, m_t: torch.Tensor, m_s: torch.Tensor, vocab: int, generator: torch.Generator,
                 fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, x_s) = argmax(m e_x0 + ε) at the margins m_t, m_s (B,) with one ε per position:
    the deterministic Gaussian trajectory, drawn without the (B, L, V) Gaussian. Only ε_x0 ~ N(0, 1),
    the largest other coordinate M (CDF Φ(z)^(V−1)) and its token j (uniform over the others)
    matter: x = x0 where ε_x0 + m > M, else j. ``fixed`` positions stay x0."""
    shape, device = x0.shape, x0.device
    own = torch.randn(shape, generator=generator, device=device, dtype=torch.float64)
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64).clamp_min(1e-300)
    largest = -torch.special.ndtri(-torch.expm1(torch.log(u) / (vocab - 1)))  # Φ^{-1}(u^{1/(V−1)}), accurately
    other = (x0 + torch.randint(1, vocab, shape, generator=generator, device=device)) % vocab

    def at(m):
        return torch.where(fixed | (own + m[:, None] > largest), x0, other)

    return at(m_t), at(m_s)


class Distillation(Objective):
    """The student's loss against a frozen ``teacher`` (an eval-mode network without gradients);
    ``round`` is set by the trainer. Not registered: it needs a teacher, so only ``dlm distill``
    builds one."""

    name = "distill"
    teacher_sampler: str  # the ``distill.teacher_sampler`` this method is

    def __init__(self, settings: DistillConfig, teacher: torch.nn.Module):
        super().__init__()
        self.distill, self.teacher, self.round = settings, teacher, 0
        self.divergence = DIVERGENCES.get(settings.divergence)

    @property
    def dt(self) -> float:
        """The teacher's step in this round: 1 / (start_steps / 2^round)."""
        return 1.0 / self.distill.teacher_steps(self.round)

    @torch.no_grad()
    def teacher_log_probs(self, predict, x, t, where) -> torch.Tensor:
        """log x_teacher(x0 | x) (N, V) float32 at ``where``, with the student's padding and time input."""
        logits = self.teacher(x, t if predict.time_conditioned else None, score_mask=where, pad=predict.pad)
        return logits.float().log_softmax(-1)

    def scored(self, student_logits: torch.Tensor, target: torch.Tensor, where: torch.Tensor) -> Scored:
        per_token = self.divergence(student_logits.float().log_softmax(-1), target)
        return Scored(per_sequence(per_token, where), token_count(where))


class SDTT(Distillation):
    teacher_sampler = "ancestral"

    def draw(self, c: Corrupted, generator, process) -> Corrupted:
        """z_t at t on the student's grid (from the family's stratified t), and the teacher's
        uniforms: whether a position unmasks at its first step, and which token it draws."""
        n = self.distill.teacher_steps(self.round) // 2
        t = (torch.ceil(c.t.double() * n).clamp(1, n) / n).to(c.t.dtype)
        xt = process.corrupt(c.x0, t, generator, ~c.target)
        u = torch.rand((*c.x0.shape, 2), generator=generator, device=c.x0.device, dtype=torch.float64)
        return Corrupted(c.x0, xt, t, c.target, negatives=u)

    def score(self, predict, c: Corrupted, where: torch.Tensor, process) -> Scored:
        return self.scored(predict(where), self.two_teacher_steps(predict, c, where, process), where)

    @torch.no_grad()
    def two_teacher_steps(self, predict, c: Corrupted, where: torch.Tensor, process) -> torch.Tensor:
        """The target (N, V) at the masked positions ``where``: p1 where the teacher's first step
        unmasks, p2 (after that step) elsewhere."""
        mid = c.t - self.dt
        p1 = self.teacher_log_probs(predict, c.xt, c.t, where)
        rows, cols = where.nonzero(as_tuple=True)
        u = c.negatives[rows, cols]  # (N, 2)
        unmask = u[:, 0] < process.unmask_probability(c.t.double(), mid.double())[rows]
        x_mid = c.xt.clone()
        x_mid[rows[unmask], cols[unmask]] = inverse_cdf(p1[unmask], u[unmask, 1])
        still = torch.zeros_like(where)
        still[rows[~unmask], cols[~unmask]] = True  # row-major, as the rows of p1 with ~unmask
        target = p1.clone()
        if still.any():
            target[~unmask] = self.teacher_log_probs(predict, x_mid, mid, still)
        return target


class DCD(Distillation):
    teacher_sampler = "duality"

    def draw(self, c: Corrupted, generator, process) -> Corrupted:
        """x_t and x_s = x_{t − dt} on one Gaussian trajectory, t = dt + (1 − dt)·(family's t)."""
        dt = self.dt
        t = dt + (1.0 - dt) * c.t.double()
        alpha = process.schedule.alpha
        V = process.vocab_size
        xt, xs = duality_pair(c.x0, gaussian_margin(alpha(t), V), gaussian_margin(alpha(t - dt), V), V, generator,
                              ~c.target)
        return Corrupted(c.x0, xt, t.to(c.t.dtype), c.target, noised=xt != c.x0, negatives=xs[..., None])

    def score(self, predict, c: Corrupted, where: torch.Tensor, process) -> Scored:
        target = self.teacher_log_probs(predict, c.negatives[..., 0], c.t - self.dt, where)
        return self.scored(predict(where), target, where)


# the method for each family it distils: a teacher of any other family is refused by name
DISTILLERS: Registry[type[Distillation]] = Registry("distillation method")
DISTILLERS.register("mdlm")(SDTT)
DISTILLERS.register("usdm")(DCD)
