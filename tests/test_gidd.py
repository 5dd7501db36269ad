"""GIDD's mask + uniform hybrid (``--family gidd``, docs/gidd.md): the process, its ELBO and its
samplers against references written from the definitions on a tiny vocabulary (dense
transition matrices, rates by autograd, enumeration), p_u = 0 against MDLM's NELBO of the same
network, the piece of the bound below ε against quadrature, and bad input through the real CLI
(the bound on a source of known entropy: tests/test_known_entropy.py, with the other families)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from dlm.batch import Batch
from dlm.families import FAMILIES
from dlm.objectives import Corrupted, MDLMNelbo
from dlm.objectives.hybrid import GiddClipped, GiddElbo, elbo_terms
from dlm.processes import MaskedProcess
from dlm.processes.hybrid import HybridProcess
from dlm.samplers.base import DiffusionSamplerSettings
from dlm.samplers.hybrid_ancestral import HybridAncestralSampler, SelfCorrectSampler, SelfCorrectSettings
from dlm.samplers.masked_ancestral import NetworkCalls
from dlm.schedules import get_schedule
from dlm.schema import ModelConfig, RunConfig
from dlm.settings import ComponentConfig, check_settings
from helpers import TINY, one_line_error, run

V = 4  # data tokens; [MASK] is id V


def hybrid(p_u: float, schedule: str = "loglinear", vocab: int = V) -> HybridProcess:
    settings = HybridProcess.Settings(p_u=p_u)
    check_settings(settings)
    return HybridProcess(vocab, get_schedule(schedule), settings)


# ---- references from the definitions -----------------------------------------------------------

def dense_marginal(x: torch.Tensor, t: torch.Tensor, p_u: float, schedule: str = "loglinear") -> torch.Tensor:
    """q_t(· | x) (V + 1,) for a probability vector x (V,): clean : mask : uniform = ᾱ : 1 − ᾱ : c,
    c = B √(ᾱ (1 − ᾱ)), B = 2 p_u / (1 − p_u), the uniform part spread evenly over the V data
    tokens. Differentiable in t."""
    a_bar = get_schedule(schedule).alpha(t)
    c = 2 * p_u / (1 - p_u) * torch.sqrt(a_bar * (1 - a_bar))
    data = a_bar * x + c / x.shape[0]
    return torch.cat([data, (1 - a_bar)[None]]) / (1 + c)


def interpolation(t, p_u, schedule="loglinear"):
    """(α_t, b_t) of the marginal q_t(·|x) = α_t x + b_t, read off ``dense_marginal``."""
    b = dense_marginal(torch.zeros(V, dtype=torch.float64), t, p_u, schedule)
    alpha = dense_marginal(torch.eye(V, dtype=torch.float64)[0], t, p_u, schedule)[0] - b[0]
    return alpha, b


def dense_transition(t, s, p_u, schedule="loglinear") -> torch.Tensor:
    """GIDD's Markov step M[i, k] = q(z_t = i | z_s = k) = α_{t|s} δ_{ik} + b_{t|s}(i) over all V + 1
    states, [MASK] included (it is not absorbing: while uniform noise grows, a [MASK] may jump to
    a uniform token)."""
    a_t, b_t = interpolation(t, p_u, schedule)
    a_s, b_s = interpolation(s, p_u, schedule)
    a_ts = a_t / a_s
    return a_ts * torch.eye(V + 1, dtype=torch.float64) + (b_t - a_ts * b_s)[:, None]


def dense_rates(t: float, p_u: float, schedule="loglinear") -> torch.Tensor:
    """R[z, y] = d/dt' q(z_{t'} = z | z_t = y) at t' = t (autograd): the forward rates."""
    s = torch.tensor(t, dtype=torch.float64)
    return torch.autograd.functional.jacobian(lambda u: dense_transition(u, s, p_u, schedule),
                                              torch.tensor(t, dtype=torch.float64))


def reference_integrand(z: int, x0: int, theta: torch.Tensor, t: float, p_u: float, schedule="loglinear") -> float:
    """The CTMC ELBO's integrand at state z (Campbell et al. 2022; SEDD's DWDSE):
    Σ_{y≠z} R(y → z) D(q(y|x0)/q(z|x0), q(y|x_θ)/q(z|x_θ)), D(r, ρ) = r log(r/ρ) − r + ρ."""
    tt = torch.tensor(t, dtype=torch.float64)
    q = dense_marginal(torch.eye(V, dtype=torch.float64)[x0], tt, p_u, schedule)
    q_hat = dense_marginal(theta, tt, p_u, schedule)
    R = dense_rates(t, p_u, schedule)
    total = 0.0
    for y in range(V + 1):
        if y == z:
            continue
        r, rho = float(q[y] / q[z]), float(q_hat[y] / q_hat[z])
        total += float(R[z, y]) * ((r * math.log(r / rho) if r > 0 else 0.0) - r + rho)
    return total


# ---- the process ------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["loglinear", "cosine"])
@pytest.mark.parametrize("p_u", [0.0, 0.3])
def test_marginal_and_its_shares(p_u, schedule):
    p = hybrid(p_u, schedule)
    for t in (0.0, 0.2, 0.5, 0.9, 1.0):
        tt = torch.tensor([t], dtype=torch.float64)
        x = torch.eye(V, dtype=torch.float64)[2][None]
        torch.testing.assert_close(p.marginal(x, tt)[0], dense_marginal(x[0], tt[0], p_u, schedule))
    ends = p.marginal(torch.eye(V, dtype=torch.float64), torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(ends[0], torch.eye(V + 1, dtype=torch.float64)[0])  # t = 0: the identity
    torch.testing.assert_close(ends[1], torch.eye(V + 1, dtype=torch.float64)[V])  # t = 1: all [MASK]
    if schedule == "loglinear":  # the uniform share is p_u at t = ½
        _, _, b_u = p.mixing(torch.tensor(0.5, dtype=torch.float64))
        assert float(V * b_u) == pytest.approx(p_u, abs=1e-12)


def test_the_markov_steps_are_valid_and_consistent():
    """b_{t|s} ≥ 0 (a valid forward chain), columns sum to 1, and M_{t|s} q_s(·|x) = q_t(·|x)
    (the marginals come from the chain)."""
    for p_u in (0.1, 0.6, 0.95):
        for s, t in ((0.0, 0.3), (0.1, 0.5), (0.4, 0.45), (0.7, 0.99), (0.2, 1.0)):
            s_, t_ = torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64)
            M = dense_transition(t_, s_, p_u)
            assert float(M.min()) >= -1e-15
            torch.testing.assert_close(M.sum(0), torch.ones(V + 1, dtype=torch.float64))
            if t < 1:  # [MASK] is not absorbing: it may jump to a uniform token (but there is none at t = 1)
                assert float(M[V, V]) < 1.0
            x = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
            torch.testing.assert_close(M @ dense_marginal(x, s_, p_u), dense_marginal(x, t_, p_u))


@pytest.mark.parametrize("p_u", [0.0, 0.3])
def test_posterior_matches_bayes_on_the_dense_chain(p_u):
    p = hybrid(p_u)
    g = torch.Generator().manual_seed(0)
    for s, t in ((0.0, 0.4), (0.3, 0.6), (0.5, 1.0), (0.8, 0.81)):
        s_, t_ = torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64)
        M = dense_transition(t_, s_, p_u)
        xs = [torch.eye(V, dtype=torch.float64)[1], torch.rand(V, generator=g, dtype=torch.float64).softmax(-1)]
        for x in xs:
            q_s = dense_marginal(x, s_, p_u)
            for i in range(V + 1):
                joint = M[i] * q_s
                if float(joint.sum()) == 0:  # an impossible z_t (a data token ≠ x at p_u = 0)
                    continue
                got = p.posterior(torch.tensor(i), x, t_, s_)
                torch.testing.assert_close(got, joint / joint.sum(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("p_u", [0.0, 0.4])
def test_corruption_draws_the_marginal(p_u):
    """Every state's frequency, where the generic contract test (a time-constant π) only holds
    at p_u = 0: P(x_t = x0) = α_t + b_t(x0)."""
    p = hybrid(p_u)
    x0 = torch.full((8, 20000), 1)
    for t in (0.0, 0.25, 0.5, 0.8, 1.0):
        xt = p.corrupt(x0, torch.full((8,), t), torch.Generator().manual_seed(5))
        hist = torch.bincount(xt.flatten(), minlength=V + 1).double() / xt.numel()
        want = dense_marginal(torch.eye(V, dtype=torch.float64)[1], torch.tensor(t, dtype=torch.float64), p_u)
        assert float((hist - want).abs().max()) < 0.006, (t, hist, want)


def test_fixed_positions_and_the_masked_draws_at_p_u_zero():
    b = Batch(torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(1)),
              torch.zeros(4, 12, dtype=torch.bool).index_fill_(1, torch.arange(3), True))
    t = torch.tensor([0.2, 0.5, 0.7, 0.95])
    p = hybrid(0.4)
    free = p.corrupt(b.x0, t, torch.Generator().manual_seed(7))
    held = p.corrupt(b.x0, t, torch.Generator().manual_seed(7), b.fixed)
    assert torch.equal(held[b.fixed], b.x0[b.fixed]) and torch.equal(held[~b.fixed], free[~b.fixed])
    assert bool(((free != b.x0) & (free != V)).any())  # uniform noise does occur
    masked = MaskedProcess(V, get_schedule("loglinear"))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(hybrid(0.0).corrupt(b.x0, t, g1, b.fixed), masked.corrupt(b.x0, t, g2, b.fixed))
    assert torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))  # no extra draws at p_u = 0


def test_predicted_positions():
    xt = torch.tensor([[0, V, 2, V]])
    assert hybrid(0.0).predicted(xt).tolist() == [[False, True, False, True]]
    assert hybrid(0.2).predicted(xt).all()


# ---- the ELBO ---------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["loglinear", "cosine"])
@pytest.mark.parametrize("p_u", [0.0, 0.25, 0.7])
def test_elbo_integrand_matches_the_ctmc_definition(p_u, schedule):
    """w_t(z, x0)·(KL + D_IS) — the process's weight and the objective's bracket — equals the
    rate-weighted generalised KL of the dense chain, rates by autograd, at every possible z."""
    p = hybrid(p_u, schedule)
    g = torch.Generator().manual_seed(2)
    for t in (0.01, 0.3, 0.5, 0.77, 0.999):
        for x0 in (0, 3):
            logits = torch.randn(V, generator=g, dtype=torch.float64) * 2
            theta = logits.softmax(-1)
            for z in range(V + 1):
                if p_u == 0 and z not in (x0, V):
                    continue  # impossible at p_u = 0
                w, div = elbo_terms(logits[None], torch.tensor([x0]), torch.tensor([z]),
                                    torch.tensor([t], dtype=torch.float64), p)
                want = reference_integrand(z, x0, theta, t, p_u, schedule)
                assert float(w * div) == pytest.approx(want, rel=1e-8, abs=1e-12), (t, x0, z)


def test_elbo_integrand_is_mdlm_at_p_u_zero():
    """At p_u = 0 GIDD's integrand is MDLM's −α'/(1 − α) · CE at each masked position, exactly."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, V, (6, 10), generator=g)
    t = torch.rand(6, generator=g, dtype=torch.float64) * 0.98 + 0.01
    xt = MaskedProcess(V, get_schedule("loglinear")).corrupt(x0, t, g)
    c = Corrupted(x0, xt, t, torch.ones_like(x0, dtype=torch.bool))
    where = xt == V
    logits = torch.randn(int(where.sum()), V, generator=g, dtype=torch.float64)
    ours = GiddElbo()(logits, c, where, hybrid(0.0))
    mdlm = MDLMNelbo()(logits, c, where, MaskedProcess(V, get_schedule("loglinear")))
    torch.testing.assert_close(ours.nats, mdlm.nats, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.count, mdlm.count)


def elbo_by_quadrature(p_u: float, data: np.ndarray, own_token: bool, nodes: int = 400) -> float:
    """E_{x0 ~ data} of the ELBO of one token, by enumeration of (x0, z) and Gauss–Legendre in v,
    t = (1 − cos πv)/2 (the integrand grows like 1/√t near 0 and like 1/√(1 − t) near 1). x_θ is
    the data distribution itself — the optimum: q_t(·|x_θ) is then the true marginal, so the
    model's reverse rates are the true ones — or, ``own_token``, the posterior p(x0 | z_t) that
    also reads the token's own noisy value."""
    w, wt = np.polynomial.legendre.leggauss(nodes)
    v = (w + 1) / 2
    t = torch.tensor((1 - np.cos(np.pi * v)) / 2, dtype=torch.float64)  # (T,)
    dt = torch.tensor(wt / 2 * np.pi / 2 * np.sin(np.pi * v), dtype=torch.float64)  # dt = (π/2) sin(πv) dv
    prior = torch.tensor(data, dtype=torch.float64)
    q = torch.stack([torch.stack([dense_marginal(torch.eye(V, dtype=torch.float64)[x], tt, p_u) for x in range(V)])
                     for tt in t])  # (T, x0, z)
    post = prior[None, :, None] * q if own_token else prior[None, :, None].expand_as(q)  # (T, x0, z) ∝ x_θ(x0 | z)
    logits = torch.log(post / post.sum(1, keepdim=True)).clamp_min(-1e4).transpose(1, 2)  # (T, z, x0)
    T, Z = len(t), V + 1
    grid_t, grid_z, grid_x = torch.meshgrid(torch.arange(T), torch.arange(Z), torch.arange(V), indexing="ij")
    possible = q[grid_t, grid_x, grid_z] > 0
    gt, gz, gx = grid_t[possible], grid_z[possible], grid_x[possible]
    wz, div = elbo_terms(logits[gt, gz], gx, gz, t[gt], hybrid(p_u))
    return float((dt[gt] * prior[gx] * q[gt, gx, gz] * wz * div).sum())


def test_the_bound_of_one_token_is_tight_at_its_optimum_and_above_the_entropy_elsewhere():
    data = np.array([0.5, 0.25, 0.15, 0.1])
    H = float(-(data * np.log(data)).sum())
    assert elbo_by_quadrature(0.0, data, own_token=False) == pytest.approx(H, rel=1e-9)
    for p_u in (0.2, 0.6):  # (to 3e-5: float64 t loses 1 − ᾱ below t ~ 1e-12, where the integrand grows like 1/√t)
        assert elbo_by_quadrature(p_u, data, own_token=False) == pytest.approx(H, abs=1e-4)
    assert elbo_by_quadrature(0.0, data, own_token=True) == pytest.approx(H, rel=1e-9)  # masking: the same x_θ
    for p_u in (0.2, 0.6):  # a uniform token's own value misleads the plug-in rates
        assert elbo_by_quadrature(p_u, data, own_token=True) > H + 0.1


def test_clipped_weighting_is_the_elbo_with_its_weight_clipped():
    p = hybrid(0.3)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, V, (5, 9), generator=g)
    t = torch.tensor([0.002, 0.1, 0.5, 0.9, 0.999])
    xt = p.corrupt(x0, t, g)
    c = Corrupted(x0, xt, t, torch.ones_like(x0, dtype=torch.bool))
    where = c.target
    logits = torch.randn(int(where.sum()), V, generator=g)
    w, div = elbo_terms(logits, x0[where], xt[where], t[where.nonzero()[:, 0]], p)
    clipped = GiddClipped(GiddClipped.Settings(max_weight=2.0))(logits, c, where, p)
    rows = where.nonzero()[:, 0]
    want = torch.zeros(5, dtype=torch.float64).index_add_(0, rows, w.clamp(0, 2) * div)
    torch.testing.assert_close(clipped.nats, want)
    assert bool((w > 2).any()) and bool((clipped.nats <= GiddElbo()(logits, c, where, p).nats + 1e-12).all())


def test_elbo_is_finite_with_gradients_at_the_ends_and_for_a_sure_wrong_network():
    for p_u in (0.0, 0.3):
        p = hybrid(p_u)
        logits = torch.tensor([[80.0, -60.0, 0.0, -200.0]] * 6, requires_grad=True)
        x0 = torch.tensor([3, 3, 0, 1, 3, 2])
        xt = torch.tensor([V, 3, V, 2 if p_u else V, V, 2])
        t = torch.tensor([1.0, 1e-5, 1e-7, 0.5, 1.0 - 1e-7, 0.3])
        w, div = elbo_terms(logits, x0, xt, t, p)
        f = w * div
        assert bool(torch.isfinite(f).all()) and bool((f >= 0).all()), f
        f.sum().backward()
        assert bool(torch.isfinite(logits.grad).all())


# ---- through the family -----------------------------------------------------------------------

def family(name="gidd", p_u=None, sampler=None, objective=None, **cfg_kw):
    cfg = RunConfig(family=name, model=ModelConfig(size="tiny", n_layer=1, d_model=32, n_head=2, cond_dim=16), **cfg_kw)
    if p_u is not None:
        cfg.process = ComponentConfig("hybrid", {"p_u": p_u})
    cfg.sampler = ComponentConfig(sampler)
    cfg.objective = ComponentConfig(objective)
    cls = FAMILIES.get(name)
    cls.resolve(cfg)
    return cls(cfg, 11, 0)


def batch(n_vocab=11) -> Batch:
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, n_vocab, (4, 12), generator=g)
    clean = torch.zeros(4, 12, dtype=torch.bool)
    clean[:, :3] = True
    pad = torch.zeros(4, 12, dtype=torch.bool)
    pad[1, -4:] = True
    return Batch(x0, clean, pad)


def test_at_p_u_zero_the_bound_and_loss_are_mdlms_with_time_conditioning():
    """The same network, the same generator draws: GIDD's ELBO at p_u = 0 is the masked NELBO of
    ``mdlm`` with time conditioning (objective nelbo), as a training loss and as the bound."""
    gidd, mdlm = family("gidd", p_u=0.0), family("mdlm", time_conditioning=True)
    assert gidd.time_conditioned and gidd.bound.name == "elbo"
    torch.manual_seed(0)
    model = gidd.build_model()
    model.eval()
    b = batch()
    with torch.no_grad():
        losses = [f.loss(model, b, torch.Generator().manual_seed(3)) for f in (gidd, mdlm)]
        bounds = [f.nll(model, b, torch.Generator().manual_seed(3), 4) for f in (gidd, mdlm)]
    torch.testing.assert_close(losses[0].nats.double(), losses[1].nats.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses[0].count, losses[1].count)
    torch.testing.assert_close(bounds[0], bounds[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective", ["elbo", "clipped"])
def test_objectives_at_p_u_positive_keep_the_objective_contract(objective):
    """The contract tests run at the process's default p_u = 0; the same checks with uniform noise."""
    fam = family(p_u=0.3, objective=objective)
    torch.manual_seed(0)
    model = fam.build_model()
    b = batch()
    s = fam.loss(model, b, torch.Generator().manual_seed(11))
    assert bool(torch.isfinite(s.nats).all()) and bool((s.nats >= 0).all())
    s.mean().backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        whole = fam.loss(model, b, torch.Generator().manual_seed(11))
        part = fam.loss(model, b, torch.Generator().manual_seed(11), slice(1, 3))
        x0 = b.x0.clone()
        x0[b.pad] = (x0[b.pad] + 1) % 11
        repadded = fam.loss(model, Batch(x0, b.clean, b.pad), torch.Generator().manual_seed(11))
        nll = fam.nll(model, b, torch.Generator().manual_seed(0), 2)
    torch.testing.assert_close(part.nats, whole.nats[1:3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(repadded.nats, whole.nats, rtol=1e-5, atol=1e-5)
    assert bool(torch.isfinite(nll).all()) and bool((nll >= 0).all())
    chunked = family(p_u=0.3, objective=objective)
    chunked.cfg.train.loss_chunk_rows = 1
    torch.testing.assert_close(chunked.loss(model, b, torch.Generator().manual_seed(11)).nats, whole.nats,
                               rtol=1e-5, atol=1e-5)


# ---- samplers ---------------------------------------------------------------------------------

class FixedLogits(nn.Module):
    """A network whose logits at each position do not depend on its input: (1, L, V)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x, t=None, score_mask=None, pad=None, **kw):
        return self.logits.expand(x.shape[0], -1, -1)[score_mask]


@pytest.mark.parametrize("p_u", [0.0, 0.3])
def test_a_step_draws_the_posterior(p_u):
    """The sampler's mixture draw of one step equals ``HybridProcess.posterior`` with x_θ in
    place of x0, at a [MASK] and at data tokens (which may be re-masked, noised or redrawn)."""
    p = hybrid(p_u)
    n = 60000
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5], [0.3, 2.0, -0.5, 0.0], [0.0, 0.0, 0.0, 3.0]])[None]
    x = torch.tensor([[V, 1, 2]]).expand(n, -1).clone()
    sampler = HybridAncestralSampler(DiffusionSamplerSettings())
    for t, s in ((0.6, 0.4), (1.0, 0.9), (0.2, 0.0)):
        tt, ss = torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
        out = sampler._step(FixedLogits(logits), p, x, torch.ones_like(x, dtype=torch.bool), tt, ss,
                            torch.Generator().manual_seed(0), None, None, NetworkCalls(n))
        for pos in range(1 if t == 1 else 3):  # at t = 1 a data token is impossible (all [MASK])
            hist = torch.bincount(out[:, pos], minlength=V + 1).double() / n
            want = p.posterior(x[:1, pos], logits[0, pos].double().softmax(-1)[None], tt, ss)[0]
            assert float((hist - want).abs().max()) < 0.008, (t, s, pos, hist, want)
        if p_u > 0 and 0 < s < t < 1:
            assert bool((out[:, 1] != 1).any()) and bool((out[:, 1] == V).any())  # decoded tokens do change


def test_self_correction_moves_to_the_networks_choice_and_keeps_clean_positions():
    target = torch.tensor([3, 1, 0, 2, 2, 1, 0, 3])
    logits = (torch.nn.functional.one_hot(target, V).float() * 6.0)[None]
    given = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0], [1, 2, 3, 0, 1, 2, 3, 0]])
    clean = torch.zeros(2, 8, dtype=torch.bool)
    clean[:, :2] = True
    settings = SelfCorrectSettings(correction_temperature=0.0, correction_steps=20, correction_tokens=2)
    sampler = SelfCorrectSampler(settings)
    x = given.clone()  # a finished sample, wrong at most positions: the pass alone
    out = sampler.finish(FixedLogits(logits), x, ~clean, torch.Generator().manual_seed(0), False, None, NetworkCalls(2))
    assert torch.equal(out[clean], given[clean])
    assert torch.equal(out[:, 2:], target[2:].expand(2, -1))
    # at most correction_tokens changes per row per call: one iteration changes ≤ 2 positions
    one = SelfCorrectSampler(dataclasses.replace(settings, correction_steps=1))
    step = one.finish(FixedLogits(logits), x, ~clean, torch.Generator().manual_seed(0), False, None, NetworkCalls(2))
    assert int((step != x).sum(-1).max()) <= 2


@pytest.mark.parametrize("sampler", ["ancestral", "self-correct"])
@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_samplers_at_p_u_positive_keep_the_sampler_contract(sampler, guidance):
    fam = family(p_u=0.3, sampler=sampler)
    torch.manual_seed(0)
    model = fam.build_model()
    model.eval()
    settings = dataclasses.replace(fam.sampler_settings, steps=8, guidance=guidance)
    given = torch.randint(0, 11, (3, 10), generator=torch.Generator().manual_seed(2))
    clean = torch.zeros(3, 10, dtype=torch.bool)
    clean[:, :2] = True
    clean[0, -3:] = True
    out, nfe = fam.sample(model, given, clean, torch.Generator().manual_seed(4), settings)
    assert out.shape == given.shape and int(out.min()) >= 0 and int(out.max()) < 11
    assert torch.equal(out[clean], given[clean]) and nfe >= 1
    again, _ = fam.sample(model, given, clean, torch.Generator().manual_seed(4), settings)
    assert torch.equal(again, out)


# ---- the command line -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    f = tmp_path_factory.mktemp("corpus") / "text.txt"
    f.write_text("".join(f"To be, or not to be, that is the question {i}.\n" for i in range(400)))
    return f


def test_train_eval_sample_through_the_cli(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(["train", "--family", "gidd", "--data", str(corpus), "--out", str(out), "--steps", "4", *TINY,
                        "process.p_u=0.1"], capsys)
    assert code == 0, err
    code, text, err = run(["eval", str(out), "--json", "--max-tokens", "512", "--mc-samples", "2"], capsys)
    assert code == 0, err
    r = json.loads(text)
    assert r["nll"] > 0 and math.isfinite(r["nll"])
    for sampler in ("ancestral", "self-correct"):
        code, text, err = run(["sample", str(out), "--prompt", "To be", "--num", "2", "--steps", "6", "--json",
                               "--sampler", sampler], capsys)
        assert code == 0, err
        assert all(s.startswith("To be") for s in json.loads(text)["samples"])


@pytest.mark.parametrize("setting,fragment", [("process.p_u=1", "process.p_u"), ("process.p_u=-0.1", "process.p_u"),
                                              ("process.p_u=nan", "process.p_u"), ("sampler=remdm", "remdm")])
def test_bad_input_is_one_line(setting, fragment, corpus, tmp_path, capsys):
    code, _, err = run(["train", "--family", "gidd", "--data", str(corpus), "--out", str(tmp_path / "r"), *TINY,
                        setting], capsys)
    one_line_error(code, err, fragment)
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_a_masked_only_sampler_is_refused_at_sampling(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["train", "--family", "gidd", "--data", str(corpus), "--out", str(out), "--steps", "2", *TINY],
               capsys)[0] == 0
    code, _, err = run(["sample", str(out), "--sampler", "remdm"], capsys)
    one_line_error(code, err, "remdm", "masked")


class TableNetwork(nn.Module):
    """x_θ(· | z) of a one-token sequence: fixed logits per state z (V + 1, V), any time."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, x, t=None, score_mask=None, pad=None, **_):
        out = self.logits[x]
        return out if score_mask is None else out[score_mask]


def exact_tail(p_u: float, data: torch.Tensor, logits: torch.Tensor, nodes: int = 200) -> float:
    """∫₀^ε E_{x0 ~ data, z ~ q_t(·|x0)} f_t(z, x0) dt for one token, by enumeration of (x0, z)
    and Gauss–Legendre in u, t = ε u² (smooth in u: the integrand grows like 1/√t)."""
    from dlm.families.diffusion import EVAL_T_MIN

    w, wt = np.polynomial.legendre.leggauss(nodes)
    u = torch.tensor((w + 1) / 2, dtype=torch.float64)
    t = EVAL_T_MIN * u * u
    dt = torch.tensor(wt / 2, dtype=torch.float64) * 2 * EVAL_T_MIN * u  # dt = 2 ε u du
    total = 0.0
    for x in range(V):
        for z in range(V + 1):
            q = torch.stack([dense_marginal(torch.eye(V, dtype=torch.float64)[x], tt, p_u)[z] for tt in t])
            n = len(t)
            wz, div = elbo_terms(logits[z].expand(n, V), torch.full((n,), x), torch.full((n,), z), t, hybrid(p_u))
            total += float(data[x] * (dt * q * wz * div).sum())
    return total


@pytest.mark.parametrize("p_u", [0.1, 0.3])
def test_the_piece_below_eps_is_estimated_without_bias(p_u):
    """``Gidd.tail``, averaged over many one-token sequences, is ∫₀^ε of the exact ELBO integrand
    (within 4 standard errors), and the whole bound adds it only where p_u > 0."""
    gidd = family("gidd", p_u=p_u)
    gidd.vocab_size = V
    gidd.process = hybrid(p_u)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(V + 1, V, generator=g, dtype=torch.float64)
    data = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    x0 = torch.multinomial(data, 200_000, replacement=True, generator=g)[:, None]
    est = gidd.tail(TableNetwork(logits), Batch(x0), torch.Generator().manual_seed(1))
    exact = exact_tail(p_u, data, logits)
    assert exact > 1e-4  # O(√ε), not O(ε): worth adding
    assert float(est.mean()) == pytest.approx(exact, abs=4 * float(est.std()) / math.sqrt(len(est))), (est.mean(), exact)
    # the test can tell a missing or misweighted piece (a uniform token is a rare event, ~2e-4
    # per draw here: one draw is noisy, its variance finite thanks to t = ε u⁴)
    assert float(est.std()) / math.sqrt(len(est)) < 0.1 * exact


def test_the_bound_adds_the_tail_only_with_uniform_noise():
    b = batch()
    torch.manual_seed(0)
    for p_u, added in ((0.0, False), (0.2, True)):
        gidd = family("gidd", p_u=p_u)
        model = gidd.build_model().eval()
        with torch.no_grad():
            whole = gidd.nll(model, b, torch.Generator().manual_seed(3), 2)
            shared = super(type(gidd), gidd).nll(model, b, torch.Generator().manual_seed(3), 2)
        assert bool((whole > shared).all()) if added else torch.equal(whole, shared)
