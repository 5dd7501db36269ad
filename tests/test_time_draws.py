"""Importance sampling of the bound's time (`eval.log_t_share`, `dlm eval --log-t-share`): a
share of the Monte Carlo times drawn log-uniformly on [1e-5, 1], each weighted by 1/q(t). The
weights make it the same integral (checked against quadrature), the estimate of a model that
denies its input token — whose integrand grows like 1/(Vp + t) near 0 — keeps its expectation
and loses most of its spread, and bad values are one line."""

import json
import math

import numpy as np
import pytest
import torch

from dlm.batch import Batch
from dlm.config import ComponentConfig, EvalConfig, RunConfig
from dlm.errors import DlmError
from dlm.families import FAMILIES
from dlm.families.diffusion import EVAL_T_MIN
from dlm.objectives import UniformNelbo
from dlm.processes import UniformProcess, log_uniform_mix, mix_density
from dlm.schedules import get_schedule
from helpers import TINY, one_line_error, run

P_DATA = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.03, 0.01], dtype=torch.float64)


@pytest.mark.parametrize("share", [0.0, 0.25, 0.9])
def test_draws_cover_the_range_and_their_weights_integrate_exactly(share):
    """On a fine stratified grid of u, Σ w(t) f(t) / N is the integral of f over [ε, 1] for a
    flat f, a rising one and one that peaks at 0 like 1/(a + t); the density integrates to 1."""
    N = 400_000
    u = (torch.arange(N, dtype=torch.float64) + 0.5) / N
    t = log_uniform_mix(u, share, EVAL_T_MIN)
    w = 1 / mix_density(t, share, EVAL_T_MIN)
    assert float(t.min()) >= EVAL_T_MIN * (1 - 1e-12) and float(t.max()) <= 1.0
    lo, hi = u < share, u >= share
    assert bool((t[lo].diff() > 0).all()) and bool((t[hi].diff() > 0).all())  # each part monotone in u
    a, eps = 1e-4, EVAL_T_MIN
    for f, exact in ((lambda x: torch.ones_like(x), 1 - eps),
                     (lambda x: x, (1 - eps * eps) / 2),
                     (lambda x: 1 / (a + x), math.log((a + 1) / (a + eps)))):
        assert float((w * f(t)).mean()) == pytest.approx(exact, rel=2e-4)
    if share == 0:
        assert torch.equal(w, torch.full_like(w, 1 - eps))
    # the density itself: ∫ q dt = 1 (Gauss–Legendre in log t, where q·t is smooth)
    s, ws = np.polynomial.legendre.leggauss(64)
    logt = (s + 1) / 2 * math.log(1 / eps) + math.log(eps)
    tt = torch.tensor(np.exp(logt))
    total = float((torch.tensor(ws) * math.log(1 / eps) / 2 * tt * mix_density(tt, share, eps)).sum())
    assert total == pytest.approx(1.0, rel=1e-9)


class Table(torch.nn.Module):
    """A one-token reverse model: x_θ = table[x_t] whatever the time."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("logits", table.log().float())

    def forward(self, x, t=None, score_mask=None, pad=None):
        out = self.logits[x]
        return out if score_mask is None else out[score_mask]


def denying_table(p_own=1e-6):
    """What `sddlm-v2` learns at a small vocabulary: p_data, except almost nothing on x_t."""
    V = len(P_DATA)
    table = P_DATA.expand(V, V).clone()
    table[torch.arange(V), torch.arange(V)] = p_own
    return table / table.sum(-1, keepdim=True)


def exact_from_eps(table):
    """∫_ε^1 E_{x0, x_t} f_t dt for one token (Gauss–Legendre in log t)."""
    V = len(P_DATA)
    process = UniformProcess(V, get_schedule("loglinear"))
    x0, xt = torch.arange(V).repeat_interleave(V), torch.arange(V).repeat(V)
    s, ws = np.polynomial.legendre.leggauss(200)
    span = math.log(1 / EVAL_T_MIN)
    total = 0.0
    for si, wi in zip((s + 1) / 2, ws / 2):
        t = EVAL_T_MIN * math.exp(span * si)
        a = 1 - t
        joint = (P_DATA[:, None] * (a * torch.eye(V, dtype=torch.float64) + (1 - a) / V)).reshape(-1)
        f = UniformNelbo().per_position(table[xt].log().float(), x0, xt, torch.full((V * V,), t, dtype=torch.float64),
                                        process)
        total += span * t * wi * float((joint * f).sum())
    return total


def usdm(share, vocab=len(P_DATA)):
    cfg = RunConfig(family="usdm", objective=ComponentConfig("nelbo", {}), time_conditioning=False,
                    eval=EvalConfig(log_t_share=share))
    return FAMILIES.get("usdm")(cfg, vocab, 0)


def mc_bound(share, table, rows=4000, mc_samples=4, seed=0):
    """The Monte Carlo part of ``dlm eval``'s bound (∫_ε^1) per row, one token per row."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.multinomial(P_DATA, rows, replacement=True, generator=gen)[:, None]
    fam = usdm(share)
    from dlm.families.diffusion import DiffusionFamily

    with torch.no_grad():
        return DiffusionFamily.nll(fam, Table(table), Batch(x0), gen, mc_samples)


def test_importance_sampling_keeps_the_bound_and_cuts_its_spread():
    """For the input-denying table the integrand near 0 is ~1/(Vp + t): uniform draws rarely
    land there, so their per-row estimates are heavy-tailed; the log-uniform share finds it.
    Both agree with quadrature within their standard errors; the mixture's spread is far
    smaller (measured on trained models: benchmarks/sddlm/time_draws.json)."""
    table = denying_table()
    exact = exact_from_eps(table)
    spread = {}
    for share in (0.0, 0.25):
        est = mc_bound(share, table)
        mean, se = float(est.mean()), float(est.std() / math.sqrt(len(est)))
        assert abs(mean - exact) < 5 * se, (share, mean, exact, se)
        spread[share] = float(est.std())
    assert spread[0.25] < spread[0.0] / 3, spread
    # a table that trusts its input (x_θ = p_data): no peak at 0, and the mixture is no worse
    plain = P_DATA.expand(len(P_DATA), -1).clone()
    est0, est1 = mc_bound(0.0, plain), mc_bound(0.25, plain)
    exact = exact_from_eps(plain)
    for est in (est0, est1):
        assert abs(float(est.mean()) - exact) < 5 * float(est.std() / math.sqrt(len(est)))
    assert float(est1.std()) < 1.5 * float(est0.std())


def test_defaults_per_family_and_what_the_bound_reports():
    assert usdm(None).log_t_share == 0.25 and usdm(0.0).log_t_share == 0.0 and usdm(0.5).log_t_share == 0.5
    assert usdm(None).bound_info()["log_t_share"] == 0.25
    mdlm_tc = FAMILIES.get("mdlm")(RunConfig(family="mdlm", time_conditioning=True), 50, 0)
    assert mdlm_tc.log_t_share == 0.0 and mdlm_tc.bound_info() == {"log_t_share": 0.0}
    mdlm = FAMILIES.get("mdlm")(RunConfig(family="mdlm"), 50, 0)  # bound over masked-token counts
    assert mdlm.log_t_share == 0.0 and "log_t_share" not in mdlm.bound_info()


@pytest.mark.parametrize("family, extra", [("ar", {}), ("mdlm", {}), ("d3pm", {})])
def test_config_refuses_it_where_no_time_is_drawn(family, extra):
    cfg = RunConfig(family=family, eval=EvalConfig(log_t_share=0.25), **extra)
    with pytest.raises(DlmError, match="eval.log_t_share is for bounds integrated over a time"):
        FAMILIES.get(family).resolve(cfg)
    FAMILIES.get("mdlm").resolve(RunConfig(family="mdlm", time_conditioning=True, eval=EvalConfig(log_t_share=0.25)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("draws")
    (d / "text.txt").write_text("".join(f"the cat sat on the mat {i % 7}.\n" for i in range(300)))
    from dlm.cli import main

    for family in ("usdm", "ar"):
        assert main(["train", "--family", family, "--data", str(d / "text.txt"), "--out", str(d / family),
                     "--steps", "2", *TINY]) == 0
    return d


def test_eval_says_how_it_drew_t_and_the_flag_changes_it(runs, capsys):
    argv = ["eval", str(runs / "usdm"), "--max-tokens", "256", "--mc-samples", "2"]
    code, out, _ = run([*argv, "--json"], capsys)
    default = json.loads(out)
    assert code == 0 and default["log_t_share"] == 0.25
    code, out, _ = run([*argv, "--json", "--log-t-share", "0"], capsys)
    uniform = json.loads(out)
    assert code == 0 and uniform["log_t_share"] == 0.0 and uniform["nll"] != default["nll"]
    code, out, _ = run(argv, capsys)
    assert code == 0 and "25% of t log-uniform" in out
    code, out, _ = run([*argv, "--log-t-share", "0"], capsys)
    assert code == 0 and "log-uniform" not in out
    from dlm.bench.report import likelihood_kind  # how `dlm bench compare` words it

    assert "25% of them log-uniform in t" in likelihood_kind(default)
    assert "log-uniform" not in likelihood_kind(uniform)


@pytest.mark.parametrize("value", ["-0.1", "1", "nan"])
def test_bad_flag_is_one_line(runs, capsys, value):
    code, _, err = run(["eval", str(runs / "usdm"), "--log-t-share", value], capsys)
    one_line_error(code, err, "--log-t-share must be in [0, 1)")


def test_flag_and_key_on_runs_that_draw_no_time_are_one_line(runs, capsys):
    code, _, err = run(["eval", str(runs / "ar"), "--log-t-share", "0.2"], capsys)
    one_line_error(code, err, "--log-t-share is for bounds integrated over a random time", "likelihood is exact")
    code, _, err = run(["train", "--family", "ar", "--data", str(runs / "text.txt"), "--out", str(runs / "x"),
                        "--steps", "2", *TINY, "eval.log_t_share=0.2"], capsys)
    one_line_error(code, err, "eval.log_t_share is for bounds integrated over a time")
    assert not (runs / "x").exists()
    for value in ("1", "-1", "half"):
        code, _, err = run(["train", "--family", "usdm", "--data", str(runs / "text.txt"), "--out", str(runs / "y"),
                            "--steps", "2", *TINY, f"eval.log_t_share={value}"], capsys)
        one_line_error(code, err, "eval.log_t_share")
    assert not (runs / "y").exists()
