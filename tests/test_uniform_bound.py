"""The uniform-state NELBO as `dlm eval` reports it: the integrand computed so that it is never
negative and stays accurate where it is tiny, the piece ∫_0^ε below the Monte Carlo range
bounded and added, and the carry-over x_θ (`--carry`)."""

import math

import numpy as np
import pytest
import torch

from dlm.batch import Batch
from dlm.config import ComponentConfig, RunConfig
from dlm.families import FAMILIES
from dlm.families.diffusion import EVAL_T_MIN
from dlm.objectives import UniformNelbo
from dlm.objectives.uniform import JumpSum
from dlm.processes import UniformProcess
from dlm.schedules import get_schedule
from helpers import TINY, one_line_error, run

P_DATA = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.03, 0.01], dtype=torch.float64)
H_DATA = float(-(P_DATA * P_DATA.log()).sum())


def reference_integrand(probs, x0, xt, t, process):
    """f_t from its definition, rate · Σ_{k≠i} [r log(r/ρ) − r + ρ], all in float64."""
    V = process.vocab_size
    a = process.schedule.alpha(t)[:, None]
    xbar = V * a * torch.nn.functional.one_hot(x0, V).double() + (1 - a)
    xbt = V * a * probs + (1 - a)
    r = xbar / xbar.gather(-1, xt[:, None])
    rho = xbt / xbt.gather(-1, xt[:, None])
    terms = (r * torch.log(r / rho) - r + rho).scatter(-1, xt[:, None], 0.0)
    return -process.schedule.alpha_prime(t) / (V * a[:, 0]) * terms.sum(-1)


@pytest.mark.parametrize("V,scale,schedule", [(16, 20.0, "loglinear"), (16, 5.0, "cosine"), (1000, 20.0, "loglinear")])
def test_integrand_is_never_negative_and_matches_float64(V, scale, schedule, gen):
    """A confident model (most positions kept and predicted with p ≈ 1): the former closed
    form came out at −10⁻⁶ here, where the true integrand is 10⁻¹⁵ or less."""
    process = UniformProcess(V, get_schedule(schedule))
    N = 400
    logits = torch.randn(N, V, generator=gen, dtype=torch.float64) * scale
    x0 = torch.where(torch.rand(N, generator=gen) < 0.8, logits.argmax(-1), torch.randint(0, V, (N,), generator=gen))
    for t in (1e-3, 0.1, 0.5, 0.99, 1 - 1e-5):
        xt = torch.where(torch.rand(N, generator=gen) < 0.7, x0, torch.randint(0, V, (N,), generator=gen))
        tt = torch.full((N,), t, dtype=torch.float64)
        f = UniformNelbo().per_position(logits.float(), x0, xt, tt, process)
        ref = reference_integrand(logits.softmax(-1), x0, xt, tt, process)
        assert bool((f >= 0).all()), (t, float(f.min()))
        torch.testing.assert_close(f, ref, rtol=2e-5, atol=2e-7)


def test_integrand_is_accurate_at_a_large_vocabulary_near_t_1(gen):
    """V = 50,257 at t = 1 − 10⁻⁵: the former closed form was off by 3·10⁻² here (a float32
    softmax sums to 1 only within ~10⁻⁵, multiplied by V² α)."""
    V, N = 50257, 48
    process = UniformProcess(V, get_schedule("loglinear"))
    logits = torch.randn(N, V, generator=gen, dtype=torch.float64) * 5
    x0 = logits.argmax(-1)
    xt = torch.where(torch.arange(N) % 2 == 0, x0, torch.randint(0, V, (N,), generator=gen))
    tt = torch.full((N,), 1 - 1e-5, dtype=torch.float64)
    f = UniformNelbo().per_position(logits.float(), x0, xt, tt, process)
    torch.testing.assert_close(f, reference_integrand(logits.softmax(-1), x0, xt, tt, process), rtol=5e-5, atol=1e-6)


def test_jump_sum_backward_is_its_gradient(gen):
    N, V = 5, 9
    x = torch.softmax(torch.randn(N, V, generator=gen, dtype=torch.float64), -1).requires_grad_(True)
    c = torch.rand(N, generator=gen, dtype=torch.float64) * 3
    u = (torch.rand(N, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
    k0 = (torch.rand(N, generator=gen, dtype=torch.float64) + 1.0).requires_grad_(True)  # no term at the clamp
    skip = torch.randint(0, V, (N, 2), generator=gen)
    skip[0, 1] = skip[0, 0]  # x_t = x0: one index skipped
    assert torch.autograd.gradcheck(lambda x, u, k0: JumpSum.apply(x, c, u, k0, skip), (x, u, k0))


def exact_omitted(schedule="loglinear", lo=1e-14, nodes=200):
    """∫_0^ε E_{x0, x_t} f_t dt for one token with the exact reverse process (x_θ = p_data),
    by Gauss–Legendre in log t (t f_t ~ t log(1/t) is smooth there)."""
    process = UniformProcess(len(P_DATA), get_schedule(schedule))
    V = len(P_DATA)
    x0 = torch.arange(V).repeat_interleave(V)
    xt = torch.arange(V).repeat(V)
    s, w = np.polynomial.legendre.leggauss(nodes)
    a, b = math.log(lo), math.log(EVAL_T_MIN)
    total = 0.0
    for si, wi in zip((s + 1) / 2 * (b - a) + a, w / 2 * (b - a)):
        t = math.exp(si)
        alpha = process.schedule.alpha(torch.tensor(t, dtype=torch.float64))
        joint = (P_DATA[:, None] * (alpha * torch.eye(V, dtype=torch.float64) + (1 - alpha) / V)).reshape(-1)
        f = reference_integrand(P_DATA.expand(V * V, V), x0, xt, torch.full((V * V,), t, dtype=torch.float64), process)
        total += wi * t * float((joint * f).sum())
    return total


def family(objective="nelbo", vocab=50, **extra):
    cfg = RunConfig(family="usdm", objective=ComponentConfig(objective, {}), **extra)
    return FAMILIES.get("usdm")(cfg, vocab, 0)


class Table(torch.nn.Module):
    """The exact reverse model of a one-token sequence: x_θ = p_data whatever x_t is."""

    def __init__(self, probs):
        super().__init__()
        self.register_buffer("logits", probs.log().float())

    def forward(self, x, t=None, score_mask=None, pad=None):
        out = self.logits.expand(*x.shape, -1)
        return out if score_mask is None else out[score_mask]


def test_the_omitted_piece_has_the_derived_size_and_the_tail_bounds_it():
    """For one token and the exact reverse process the NELBO is H exactly, and ∫_0^ε is about
    (V − 1)/V ε (log(1/ε) + 1) ≈ 1.1·10⁻⁴ nats at V = 7 — ten times what dlm used to say. The
    tail that `dlm eval` now adds bounds it, by about twice (the changed positions' part is
    bounded for any x_θ)."""
    V, eps = len(P_DATA), EVAL_T_MIN
    omitted = exact_omitted()
    lead = (V - 1) / V * eps * (math.log(1 / eps) + 1)
    assert 0.95 * lead < omitted < 1.15 * lead, (omitted, lead)
    fam = family(vocab=V, time_conditioning=False)
    x0 = torch.arange(V)[:, None]
    parts = fam.tail(Table(P_DATA), Batch(x0), torch.Generator().manual_seed(0))
    assert float(parts["next_to_change"].abs().sum() + parts["crowded"].abs().sum()) == 0  # one token: nothing else changes
    tail = float((P_DATA * sum(parts.values())).sum())
    assert omitted <= tail <= 2.5 * omitted, (omitted, tail)


def test_changed_part_bounds_any_model_and_is_attained(gen):
    """At a changed position f_t ≤ −α' Φ(α)/(V α) for every x_θ, with equality when x_θ puts
    all its mass on the (wrong) input token; its integral matches adaptive quadrature."""
    import mpmath

    V, N = 18, 3000
    process = UniformProcess(V, get_schedule("loglinear"))
    logits = torch.randn(N, V, generator=gen, dtype=torch.float64) * torch.rand(N, 1, generator=gen, dtype=torch.float64) * 8
    x0 = torch.randint(0, V, (N,), generator=gen)
    xt = (x0 + torch.randint(1, V, (N,), generator=gen)) % V
    logits[:100] = -1e4
    logits[torch.arange(100), xt[:100]] = 0.0  # x_θ = e_{x_t}: the worst case
    t = torch.rand(N, generator=gen, dtype=torch.float64) * 0.01 + 1e-8
    f = UniformNelbo().per_position(logits.float(), x0, xt, t, process)
    bound = torch.from_numpy(UniformNelbo.changed_bound(V, t.numpy()))  # 1 − α = t
    assert bool((f <= bound * (1 + 1e-5)).all())
    torch.testing.assert_close(f[:100], bound[:100], rtol=1e-5, atol=0)

    def integrand(u):
        return u * (V - 1) / V * UniformNelbo.changed_bound(V, np.array(u))

    ref = float(mpmath.quad(lambda u: integrand(float(u)), [0, 1e-12, 1e-9, 1e-7, EVAL_T_MIN]))
    # (1 − α_ε = ε for the log-linear schedule)
    assert UniformNelbo.changed_tail(V, 1 - EVAL_T_MIN) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("p", [0.6, 1e-3, 1e-12])
def test_kept_part_is_the_integral_of_its_bound(p):
    """K(p) = ∫_0^ε g dt in closed form (g ≥ f at a kept position), K₁(p) ≥ ∫_0^ε (1 − α)(V − 1)/V f dt."""
    import mpmath

    V, eps = 18, EVAL_T_MIN
    process = UniformProcess(V, get_schedule("loglinear"))
    probs = torch.full((1, V), (1 - p) / (V - 1), dtype=torch.float64)
    probs[0, 3] = p
    three = torch.tensor([3])

    def f(t):
        return float(reference_integrand(probs, three, three, torch.tensor([float(t)], dtype=torch.float64), process)[0])

    def g(t):
        a = 1 - t
        return V * (1 - p) / ((V * a * p + t) * (V * a + t))

    cuts = [0, *[c for c in (1e-14, 1e-12, 1e-10, 1e-8, 1e-6) if c < eps], eps]
    logp = torch.tensor([math.log(p)], dtype=torch.float64)
    K = float(UniformNelbo().kept_tail(logp, 1 - eps, V))
    K1 = float(UniformNelbo().kept_tail(logp, 1 - eps, V, next_to_change=True))
    assert K == pytest.approx(float(mpmath.quad(g, cuts)), rel=1e-9)
    assert K >= float(mpmath.quad(lambda t: f(max(float(t), 1e-300)), cuts[1:])) * (1 - 1e-6)
    near = float(mpmath.quad(lambda t: t * (V - 1) / V * f(float(t)), cuts[1:]))
    assert near <= K1 <= 2.5 * near + 1e-30


@torch.no_grad()
def test_tail_parts_bound_their_exact_values(gen):
    """Three tokens, V = 3, a context-dependent network: every x_t enumerated, each part of the
    exact ∫_0^ε (split by the set of changed positions) against its bound; the part next to one
    change is an estimate over the changed position drawn, averaged here over many draws.

    The network runs in float64. In exact arithmetic the kept part's bound exceeds its exact
    value by only 8.5·10⁻⁶ relative here (g − f and 1 − P(no change) are O(ε)), while a float32
    network gives x_θ(x0) ≈ 2.3·10⁻⁶ — which K ∝ 1/p amplifies — with a relative error of
    5·10⁻⁶ to 2·10⁻⁵ that depends on the batch shape and the CPU's kernels: the reference (one
    27-row pass) and the family (a 1-row pass) then disagree by more than the margin, and the
    float32 test passed or failed with the machine. In float64 both see the same x_θ to ~10⁻¹⁵."""
    V, L = 3, 3
    fam = family(vocab=V, time_conditioning=False)
    torch.manual_seed(0)
    model = fam.build_model().eval()
    torch.nn.init.normal_(model.head.weight, std=2.0)
    model = model.double()
    x0 = torch.tensor([[0, 2, 1]])
    grid = torch.cartesian_prod(*[torch.arange(V)] * L)  # (27, 3) every x_t
    p = model(grid).softmax(-1).double()  # x_θ of each x_t (the time input is irrelevant here)
    changed = grid != x0
    w, wt = np.polynomial.legendre.leggauss(80)
    exact = {"changed": 0.0, "kept": 0.0, "next_to_change": 0.0, "crowded": 0.0}
    for wi, wti in zip((w + 1) / 2, wt / 2):
        t = EVAL_T_MIN * wi * wi
        a = 1 - t
        q = torch.where(changed, (1 - a) / V, a + (1 - a) / V).prod(-1)  # q(x_t | x0)
        f = reference_integrand(p.reshape(-1, V), x0.expand(27, L).reshape(-1), grid.reshape(-1),
                                torch.full((27 * L,), t, dtype=torch.float64), fam.process).view(27, L)
        weight = 2 * EVAL_T_MIN * wi * wti
        k = changed.sum(-1, keepdim=True)
        for name, mask in (("changed", changed), ("kept", ~changed & (k == 0)),
                           ("next_to_change", ~changed & (k == 1)), ("crowded", ~changed & (k >= 2))):
            exact[name] += weight * float((q[:, None] * f * mask).sum())
    parts = {name: [] for name in exact}
    for seed in range(40):
        for name, value in fam.tail(model, Batch(x0), torch.Generator().manual_seed(seed)).items():
            parts[name].append(float(value[0]))
    # every part but one is deterministic; the one next to a change draws (j, r): its expectation,
    # n Σ_{l≠j} K₁ averaged over all j and r ≠ x0^j, from the same x_θ the family reads
    options = []
    for j in range(L):
        for r in range(V):
            if r != int(x0[0, j]):
                x1 = x0.clone()
                x1[0, j] = r
                logp = model(x1).log_softmax(-1)[0, torch.arange(L), x0[0]].double()
                others = torch.arange(L) != j
                options.append(L * float(fam.bound.kept_tail(logp[others], 1 - EVAL_T_MIN, V, next_to_change=True).sum()))
    assert all(min(abs(v - o) for o in options) < 1e-9 * max(options) for v in parts["next_to_change"])
    assert len({round(v / max(options), 9) for v in parts["next_to_change"]}) > 1  # the draw does move
    bound = {name: values[0] for name, values in parts.items()}
    bound["next_to_change"] = float(np.mean(options))
    for name in exact:
        assert exact[name] <= bound[name] * (1 + 1e-9), (name, exact[name], bound[name])
    assert bound["kept"] == pytest.approx(exact["kept"], rel=1e-3)  # g − f and P(no change) − 1 are O(ε)
    assert bound["next_to_change"] == pytest.approx(exact["next_to_change"], rel=0.02)


def test_carry_is_the_bound_of_the_mixture_and_stays_above_the_entropy():
    """``carry`` λ computes the NELBO of x_θ = (1 − λ) softmax + λ e_{x_t} (the same as handing
    that mixture in as logits), and every λ gives a valid bound: for SDDLM's minimiser on one
    token (no mass on the input token) the bound drops by nats, never below H."""
    V = len(P_DATA)
    process = UniformProcess(V, get_schedule("loglinear"))
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, V, generator=gen)
    x0, xt = torch.randint(0, V, (64,), generator=gen), torch.randint(0, V, (64,), generator=gen)
    t = torch.rand(64, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    mixed = 0.7 * logits.double().softmax(-1) + 0.3 * torch.nn.functional.one_hot(xt, V)
    carried = UniformNelbo(carry=0.3).per_position(logits, x0, xt, t, process)
    torch.testing.assert_close(carried, UniformNelbo().per_position(mixed.log().float(), x0, xt, t, process), rtol=1e-5, atol=1e-7)

    no_own = P_DATA.expand(V, V).clone()
    no_own[torch.arange(V), torch.arange(V)] = 1e-6
    no_own = no_own / no_own.sum(-1, keepdim=True)  # row x_t: what `sddlm` learns
    bounds = [exact_nelbo_with(UniformNelbo(carry=lam), no_own) for lam in (0.0, 0.1, 0.3, 0.6)]
    assert bounds[0] > H_DATA + 1.0
    assert min(bounds[1:]) < bounds[0] - 0.5
    assert all(b > H_DATA - 2e-4 for b in bounds)


def exact_nelbo_with(bound, table):
    """∫₀¹ E_{x0, x_t} f_t dt for one token, x_θ = table[x_t] (Gauss–Legendre in t = u²)."""
    V = len(P_DATA)
    process = UniformProcess(V, get_schedule("loglinear"))
    x0, xt = torch.arange(V).repeat_interleave(V), torch.arange(V).repeat(V)
    u, w = np.polynomial.legendre.leggauss(200)
    total = 0.0
    for ui, wi in zip((u + 1) / 2, w / 2):
        t = float(ui * ui)
        a = 1 - t
        joint = (P_DATA[:, None] * (a * torch.eye(V, dtype=torch.float64) + (1 - a) / V)).reshape(-1)
        f = bound.per_position(table[xt].log().float(), x0, xt, torch.full((V * V,), t, dtype=torch.float64), process)
        total += 2 * ui * wi * float((joint * f).sum())
    return total


@pytest.fixture(scope="module")
def usdm_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("carry")
    (d / "text.txt").write_text("".join(f"the cat sat on the mat {i % 7}.\n" for i in range(300)))
    from dlm.cli import main

    assert main(["train", "--family", "usdm", "--objective", "sddlm-v2", "--data", str(d / "text.txt"),
                 "--out", str(d / "run"), "--steps", "4", *TINY]) == 0
    return d / "run"


def test_eval_reports_which_x_theta_it_bounded(usdm_run, capsys):
    import json

    code, out, _ = run(["eval", str(usdm_run), "--json", "--max-tokens", "256", "--mc-samples", "1"], capsys)
    plain = json.loads(out)
    assert code == 0 and plain["x_theta"] == "softmax" and plain["carry"] == 0
    code, out, _ = run(["eval", str(usdm_run), "--json", "--max-tokens", "256", "--mc-samples", "1", "--carry", "0.3"], capsys)
    carried = json.loads(out)
    assert code == 0 and carried["carry"] == 0.3 and "0.3" in carried["x_theta"]
    assert carried["nll"] != plain["nll"]
    code, out, _ = run(["eval", str(usdm_run), "--max-tokens", "256", "--mc-samples", "1", "--carry", "0.3"], capsys)
    assert code == 0 and "x_θ = (1 − 0.3) softmax + 0.3 e_x_t" in out


@pytest.mark.parametrize("value", ["-0.1", "1", "nan"])
def test_bad_carry_is_one_line(usdm_run, capsys, value):
    code, _, err = run(["eval", str(usdm_run), "--max-tokens", "256", "--carry", value], capsys)
    one_line_error(code, err, "--carry must be in [0, 1)")


def test_carry_on_another_family_is_one_line(tmp_path, capsys):
    (tmp_path / "text.txt").write_text("".join(f"a b c {i % 5}\n" for i in range(300)))
    assert run(["train", "--family", "ar", "--data", str(tmp_path / "text.txt"), "--out", str(tmp_path / "r"),
                "--steps", "2", *TINY], capsys)[0] == 0
    code, _, err = run(["eval", str(tmp_path / "r"), "--carry", "0.2"], capsys)
    one_line_error(code, err, "--carry is for uniform-state runs (usdm)")
