"""D3PM (discrete time): the closed-form algebra against dense |V|×|V| matrices, every ELBO
term and the whole bound against brute force, the absorbing bound against MDLM's
continuous-time one as T grows, the sampler, and the CLI."""

import itertools
import json
import math

import pytest
import torch

from dlm.batch import Batch
from dlm.cli import main
from dlm.config import RunConfig, from_dict
from dlm.families import FAMILIES
from dlm.objectives.discrete import step_terms
from dlm.objectives.base import Corrupted
from dlm.processes import AbsorbingD3PM, UniformD3PM
from dlm.processes.discrete import D3PMSettings, DiscreteTime
from dlm.schedules import get_schedule
from helpers import one_line_error, run, score

V = 5


def process(kind: str, T: int, schedule: str = "cosine"):
    cls = {"absorbing": AbsorbingD3PM, "uniform": UniformD3PM}[kind]
    return cls(V, get_schedule(schedule), D3PMSettings(steps=T))


def dense_q(p, alpha: float) -> torch.Tensor:
    """α I + (1 − α) 1 πᵀ as a dense (S, S) float64 matrix."""
    S = p.num_states
    pi = p.log_pi("cpu", torch.float64).exp()
    return alpha * torch.eye(S, dtype=torch.float64) + (1 - alpha) * torch.ones(S, 1, dtype=torch.float64) * pi


def alpha_bar(p, i: int) -> float:
    return float(p.schedule.alpha(torch.tensor(i / p.steps, dtype=torch.float64)))


def step_matrix(p, i: int) -> torch.Tensor:
    """Q_i = Q(ᾱ_i / ᾱ_{i−1})."""
    return dense_q(p, alpha_bar(p, i) / alpha_bar(p, i - 1))


def product(p, s: int, t: int) -> torch.Tensor:
    """Q_{s+1} ⋯ Q_t, dense."""
    out = torch.eye(p.num_states, dtype=torch.float64)
    for i in range(s + 1, t + 1):
        out = out @ step_matrix(p, i)
    return out


def brute_reverse(p, xt: int, x: torch.Tensor, s: int, t: int) -> torch.Tensor:
    """Σ_{x0} x(x0) q(x_s, x_t | x0), normalised over x_s, from dense products."""
    joint = (x @ product(p, 0, s)) * product(p, s, t)[:, xt]
    return joint / joint.sum()


@pytest.mark.parametrize("kind", ["absorbing", "uniform"])
def test_products_and_cumulative_matrices_match_dense_ones(kind):
    p = process(kind, T=7)
    for i in range(1, 8):  # Q_1 ⋯ Q_i = Q(ᾱ_i): the closed form the code relies on
        assert torch.allclose(product(p, 0, i), dense_q(p, alpha_bar(p, i)), atol=1e-12)
    x = torch.rand(3, p.num_states, dtype=torch.float64).softmax(-1)
    if kind == "absorbing":
        x[:, p.mask_id] = 0
        x = x / x.sum(-1, keepdim=True)
    for s, t in [(0, 3), (2, 5), (4, 7), (6, 7)]:
        a_s, a_t = torch.full((3,), alpha_bar(p, s), dtype=torch.float64), torch.full((3,), alpha_bar(p, t), dtype=torch.float64)
        got = p.log_marginal(x.log(), a_s).exp()  # x Q̄_s
        assert torch.allclose(got, x @ product(p, 0, s), atol=1e-12)
        xt = torch.tensor([0, 3, p.num_states - 1])
        col = p.log_transition_column(xt, a_t / a_s, torch.float64).exp()  # Q_{t|s}[·, x_t]
        assert torch.allclose(col, product(p, s, t)[:, xt].T, atol=1e-12)


@pytest.mark.parametrize("kind", ["absorbing", "uniform"])
def test_reverse_step_posterior_kl_and_prior_match_brute_force(kind):
    p = process(kind, T=6)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, V, generator=g, dtype=torch.float64)
    log_x = p.log_probs_x0(logits)  # (4, S)
    x0 = torch.tensor([0, 1, 4, 2])
    for s, t in [(0, 1), (0, 4), (2, 3), (3, 6)]:
        for xt_val in range(p.num_states):
            if product(p, s, t)[:, xt_val].sum() == 0:
                continue  # x_t unreachable at t (an unmasked token at ᾱ_t = 0): never drawn
            xt = torch.full((4,), xt_val)
            a_t = torch.full((4,), alpha_bar(p, t), dtype=torch.float64)
            a_s = torch.full((4,), alpha_bar(p, s), dtype=torch.float64)
            got_p = p.reverse_log_probs(xt, log_x, a_t, a_s).exp()
            kl = p.posterior_kl(xt, x0, log_x, a_t, a_s)
            generic = DiscreteTime.posterior_kl(p, xt, x0, log_x, a_t, a_s)  # each chain's closed form
            assert torch.allclose(kl, generic, atol=1e-12), (kl, generic)
            for n in range(4):
                want_p = brute_reverse(p, xt_val, log_x[n].exp(), s, t)
                assert torch.allclose(got_p[n], want_p, atol=1e-12)
                # the true posterior q(x_s | x_t, x0) by Bayes' rule with dense matrices
                reach = product(p, 0, t)[x0[n], xt_val]
                if reach == 0:
                    continue  # x_t cannot follow x0: never drawn
                q = product(p, 0, s)[x0[n]] * product(p, s, t)[:, xt_val] / reach
                assert torch.allclose(q.sum(), torch.tensor(1.0, dtype=torch.float64))
                want_kl = sum(float(q[j] * (q[j].log() - want_p[j].log())) for j in range(p.num_states) if q[j] > 0)
                assert kl[n].item() == pytest.approx(want_kl, abs=1e-10)
                if s == 0:  # the reconstruction term is −log p_θ(x0 | x_t)
                    assert kl[n].item() == pytest.approx(-math.log(want_p[x0[n]]), abs=1e-10)
    # the prior term: KL(x0 Q̄_T ‖ π), 0 here (α(1) = 0), and its formula at an earlier end
    assert p.prior_kl() == pytest.approx(0.0, abs=1e-12)
    if kind == "uniform":
        p.schedule.alpha = lambda t: 0.5 * (1 - t) + 0.25  # a chain that ends at ᾱ_T = 0.25
        q = dense_q(p, 0.25)[0]
        assert p.prior_kl() == pytest.approx(float((q * (q * V).log()).sum()), abs=1e-12)


def tiny_family(kind: str, T: int, stride: int = 1, time_conditioning: bool = True, schedule="cosine"):
    cfg = from_dict({"family": "d3pm", "process": {"name": kind, "steps": T}, "schedule": schedule,
                     "time_conditioning": time_conditioning, "eval": {"time_stride": stride},
                     "model": {"size": "tiny", "n_layer": 1, "d_model": 32, "n_head": 2}})
    fam = FAMILIES.get("d3pm")(cfg, V, 0)
    torch.manual_seed(0)
    model = fam.build_model()
    for prm in model.parameters():  # larger weights: the prediction depends clearly on the context
        prm.data.mul_(3.0)
    return fam, model.eval()


def strided_grid(T: int, stride: int) -> list[int]:
    """The grid eval.time_stride = K stands for, written out: round(T/K) jumps (halves up), at
    the integer times nearest to an even spacing (the ancestral sampler's grid)."""
    n = max(1, math.floor(T / stride + 0.5))
    return [round(T - k * T / n) for k in range(n + 1)]


def exact_bound(fam, model, x0: torch.Tensor, stride: int) -> float:
    """The NELBO of one sequence over the grid of ``stride`` by enumerating every x_t ∈ S^L,
    dense matrices."""
    p = fam.process
    T, L, S = p.steps, len(x0), p.num_states
    states = torch.tensor(list(itertools.product(range(S), repeat=L)))  # (S^L, L)
    total = 0.0
    grid = strided_grid(T, stride)
    for t, s in zip(grid, grid[1:]):
        bar_s, ts, bar_t = product(p, 0, s), product(p, s, t), product(p, 0, t)
        qt = bar_t[x0]  # (L, S): q(x_t^l | x0^l)
        prob = qt[torch.arange(L), states].prod(-1)  # (S^L,)
        keep = prob > 0
        xs = states[keep]
        with torch.no_grad():
            tt = torch.full((len(xs),), t / T) if fam.time_conditioned else None
            logits = model(xs, tt).double()  # (n, L, V)
        log_x = p.log_probs_x0(logits.reshape(-1, V)).reshape(len(xs), L, S)
        for row, (seq, w) in enumerate(zip(xs, prob[keep])):
            for l in range(L):
                q = bar_s[x0[l]] * ts[:, seq[l]] / bar_t[x0[l], seq[l]]
                pm = (log_x[row, l].exp() @ bar_s) * ts[:, seq[l]]
                pm = pm / pm.sum()
                total += float(w) * sum(float(q[j] * (q[j].log() - pm[j].log())) for j in range(S) if q[j] > 0)
    return total


@pytest.mark.parametrize("kind,T,stride", [("absorbing", 4, 1), ("absorbing", 4, 2), ("uniform", 4, 1), ("uniform", 4, 3),
                                           ("absorbing", 5, 2), ("uniform", 5, 2)])
def test_the_whole_bound_matches_an_enumeration(kind, T, stride, one_thread):
    fam, model = tiny_family(kind, T=T, stride=stride)
    x0 = torch.tensor([1, 3, 0])
    want = exact_bound(fam, model, x0, stride)
    n = 4000
    batch = Batch(x0.repeat(n, 1))
    nats = fam.nll(model, batch, torch.Generator().manual_seed(1), mc_samples=1)  # (n,) one draw of x_t per term
    mean, se = nats.mean().item(), nats.std().item() / math.sqrt(n)
    assert abs(mean - want) < 4 * se + 1e-9, (mean, want, se)
    assert fam.bound_info()["bound_steps"] == len(strided_grid(T, stride)) - 1


@pytest.mark.parametrize("T,stride", [(1000, 7), (1000, 50), (10, 3), (10, 4), (5, 2), (4, 8), (7, 7)])
def test_the_strided_bound_is_over_the_grid_the_sampler_walks(T, stride, one_thread):
    """eval.time_stride = K: the bound sums the jumps of the grid sampler.steps = round(T/K)
    visits (issue 19: K = 7 at T = 1000 summed 1000, 993, …, 6 → 0, not the sampler's grid)."""
    from dlm.processes.discrete import step_grid, strided_steps

    fam, _ = tiny_family("uniform", T=T, stride=stride)
    n = fam.bound_info()["bound_steps"]
    assert n == strided_steps(T, stride) == len(strided_grid(T, stride)) - 1
    assert fam.eval_steps() == strided_grid(T, stride)[:-1] == step_grid(T, n)[:-1].tolist()
    if T % stride == 0:
        assert fam.eval_steps() == list(range(T, 0, -stride))  # as before where K divides T
    if T <= 10:  # the sampler with steps = n calls the network at exactly those times
        fam, model = tiny_family("uniform", T=T, stride=stride)
        seen = []
        hook = model.register_forward_pre_hook(lambda m, args: seen.append(round(float(args[1][0]) * T)))
        from dlm.samplers.base import SamplerSettings

        fam.sample(model, torch.zeros((2, 3), dtype=torch.long), torch.zeros((2, 3), dtype=torch.bool),
                   torch.Generator().manual_seed(0), SamplerSettings(steps=n))
        hook.remove()
        assert seen == fam.eval_steps()


TOY_V, TOY_X0 = 3, torch.tensor([0, 1, 2])


def enumerated_bound(stride: int, denoiser, data) -> float:
    """E_{x0 ~ data} of the D3PM family's bound (its grid and step term) on a T = 16 absorbing
    chain, every x_t enumerated (each position kept or masked); ``denoiser(xt)`` → logits."""
    cfg = from_dict({"family": "d3pm", "process": {"name": "absorbing", "steps": 16}, "schedule": "loglinear",
                     "eval": {"time_stride": stride}})
    fam = FAMILIES.get("d3pm")(cfg, TOY_V, 0)
    p, bound = fam.process, fam.make_bound()
    assert p.prior_kl() == 0.0
    total = 0.0
    for x0, w in data:
        masks = torch.tensor(list(itertools.product([False, True], repeat=len(x0))))  # (2^L, L)
        xt = torch.where(masks, p.mask_id, x0.expand(len(masks), -1))
        for i in fam.eval_steps():
            a = float(p.schedule.alpha(torch.tensor(i / p.steps, dtype=torch.float64)))
            prob = a ** (~masks).sum(-1).double() * (1 - a) ** masks.sum(-1).double()  # q(x_t | x0)
            t = torch.full((len(masks),), i / p.steps)
            nats = score(bound, denoiser(xt), x0.expand(len(masks), -1), xt, t, p).nats
            total += w * float((prob * nats.double()).sum())
    return total


def test_a_finer_grid_can_loosen_the_bound_of_an_arbitrary_denoiser(one_thread):
    """docs/d3pm.md: no ordering holds for an arbitrary denoiser. This fixed one is sure of the
    sequence with nothing visible and guesses uniformly once it sees a token: its loss per
    masked token grows with the context, and the bound grows as the grid is refined."""
    def forgetful(xt):
        logits = torch.zeros(*xt.shape, TOY_V)
        sure = torch.full((len(TOY_X0), TOY_V), -2.0).scatter(-1, TOY_X0[:, None], 2.0)
        logits[(xt == TOY_V).all(-1)] = sure
        return logits

    bounds = [enumerated_bound(k, forgetful, [(TOY_X0, 1.0)]) for k in (16, 8, 4, 2, 1)]  # 1, 2, 4, 8, 16 jumps
    assert all(a < b for a, b in zip(bounds, bounds[1:])), bounds  # 0.108, 1.303, 1.802, 2.026, 2.132 nats


def test_a_finer_grid_tightens_the_bound_of_the_exact_denoiser(one_thread):
    """docs/d3pm.md: what holds. With the exact denoiser p(x0^l | visible tokens) of a data
    distribution, averaged over that distribution, a grid that refines another gives a bound
    no larger (the bound is a left Riemann sum in ᾱ of the expected loss per masked token, which
    more context never raises for the true conditionals)."""
    g = torch.Generator().manual_seed(0)
    seqs = torch.tensor(list(itertools.product(range(TOY_V), repeat=3)))
    weights = (3 * torch.randn(len(seqs), generator=g, dtype=torch.float64)).softmax(0)

    def exact(xt):
        out = torch.empty(*xt.shape, TOY_V)
        for r, row in enumerate(xt):
            seen = row != TOY_V
            consistent = weights * (seqs[:, seen] == row[seen]).all(-1)
            for pos in range(len(row)):
                probs = torch.zeros(TOY_V, dtype=torch.float64).index_add_(0, seqs[:, pos], consistent)
                out[r, pos] = (probs / probs.sum()).clamp_min(1e-30).log()
        return out

    bounds = [enumerated_bound(k, exact, [(x, float(w)) for x, w in zip(seqs, weights)]) for k in (16, 8, 4, 2, 1)]
    assert all(a > b for a, b in zip(bounds, bounds[1:])), bounds  # 2.279, 1.976, 1.816, 1.734, 1.692
    assert bounds[-1] >= -float((weights * weights.log()).sum())  # and still a bound: the entropy is 1.650


def mdlm_exact(fam, model, x0: torch.Tensor) -> float:
    """MDLM's continuous-time NELBO of a model without time conditioning, exactly: the sum
    over mask sets of each size k of (1/k)·mean over the sets of Σ_{masked l} −log p_θ(x0^l)."""
    L = len(x0)
    total = 0.0
    for k in range(1, L + 1):
        sets = list(itertools.combinations(range(L), k))
        xs = x0.repeat(len(sets), 1)
        for r, S in enumerate(sets):
            xs[r, list(S)] = fam.process.mask_id
        with torch.no_grad():
            logp = model(xs, None).double().log_softmax(-1)  # (n, L, V)
        nll = sum(-float(logp[r, l, x0[l]]) for r, S in enumerate(sets) for l in S)
        total += nll / len(sets) / k
    return total


def test_the_absorbing_bound_approaches_mdlms_continuous_bound_as_T_grows(one_thread):
    """Same network (no time conditioning), log-linear schedule: the D3PM bound with T steps
    is exact by enumeration; it decreases towards MDLM's continuous-time bound."""
    x0 = torch.tensor([1, 3, 0, 2])
    gaps = []
    for T in (1, 4, 16, 64):
        fam, model = tiny_family("absorbing", T=T, time_conditioning=False, schedule="loglinear")
        gaps.append(exact_bound(fam, model, x0, 1) - mdlm_exact(fam, model, x0))
    assert all(g > -1e-9 for g in gaps), gaps  # never below the continuous-time bound
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps  # tighter with every refinement
    assert gaps[-1] < 0.05 * gaps[0], gaps  # and towards it


@pytest.mark.parametrize("kind", ["absorbing", "uniform"])
def test_sampler_keeps_clean_tokens_and_ends_without_masks(kind, one_thread):
    fam, model = tiny_family(kind, T=20)
    given = torch.zeros((3, 6), dtype=torch.long)
    given[:, :2] = torch.tensor([4, 1])
    clean = torch.zeros((3, 6), dtype=torch.bool)
    clean[:, :2] = True
    from dlm.samplers.base import SamplerSettings

    for steps in (20, 7, 1):
        x, nfe = fam.sample(model, given, clean, torch.Generator().manual_seed(0), SamplerSettings(steps=steps))
        assert (x[:, :2] == given[:, :2]).all()
        assert int(x.max()) < V and int(x.min()) >= 0  # no [MASK] left, only data tokens
        assert 0 < nfe <= steps
    from dlm.errors import DlmError

    with pytest.raises(DlmError, match="≤ the process's T = 20"):
        fam.sample(model, given, clean, torch.Generator().manual_seed(0), SamplerSettings(steps=21))


def test_hybrid_loss_is_T_times_the_step_term_plus_lambda_ce(one_thread):
    fam, model = tiny_family("uniform", T=10)
    p = fam.process
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, V, (2, 5), generator=g)
    t = torch.tensor([0.3, 1.0])
    c = Corrupted(x0, p.corrupt(x0, t, g), t, torch.ones_like(x0, dtype=torch.bool))
    where = c.target
    logits = torch.randn(int(where.sum()), V, generator=g)
    kl, log_x = step_terms(logits, c, where, p, torch.float32)
    ce = -log_x.gather(-1, x0[where][:, None])[:, 0]
    got = fam.objective(logits, c, where, p)
    want = 10 * kl.view(2, 5).sum(-1) + 0.01 * ce.view(2, 5).sum(-1)
    assert torch.allclose(got.nats, want)
    assert got.count.tolist() == [5.0, 5.0]


def test_config_sections_and_bad_input(tmp_path, capsys):
    cfg = from_dict({"family": "d3pm", "process": "uniform"})
    assert cfg.process.name == "uniform" and cfg.process.settings == {"steps": 1000}
    assert cfg.objective.name == "hybrid" and cfg.objective.settings == {"ce_weight": 0.01}
    assert "process" not in RunConfig().to_dict()  # families with one process: config.yaml as before
    out = tmp_path / "r"
    for argv, frag in [
        (["--family", "d3pm", "process=gaussian"], "unknown d3pm process 'gaussian'"),
        (["--family", "d3pm", "process.steps=0"], "process.steps"),
        (["--family", "d3pm", "objective.ce_weight=-1"], "objective.ce_weight"),
        (["--family", "mdlm", "process=uniform"], "drop the process section"),
        (["--family", "mdlm", "eval.time_stride=2"], "eval.time_stride is for discrete-time"),
        (["--family", "d3pm", "eval.time_stride=0"], "eval.time_stride"),
    ]:
        code, _, err = run(["train", "--out", str(out), "--steps", "1", *argv], capsys)
        one_line_error(code, err, frag)
        assert not out.exists()


@pytest.mark.slow
def test_train_eval_sample_through_the_cli(tmp_path, capsys):
    out = tmp_path / "d3"
    code, _, _ = run(["train", "--out", str(out), "--family", "d3pm", "--steps", "3", "--batch-size", "4",
                      "--seq-len", "16", "--tokenizer", "char", "--quiet", "process.steps=50"], capsys)
    assert code == 0
    code, outp, _ = run(["eval", str(out), "--json", "--max-tokens", "64", "--mc-samples", "1", "--time-stride", "10"], capsys)
    r = json.loads(outp)
    assert code == 0 and r["bound"] and r["bound_steps"] == 5 and r["time_stride"] == 10 and r["process_steps"] == 50
    assert math.isfinite(r["nll"]) and r["nll"] > 0
    code, outp, _ = run(["eval", str(out), "--max-tokens", "64", "--mc-samples", "1", "--time-stride", "25"], capsys)
    assert code == 0 and "2-step model (T = 50, stride 25)" in outp
    code, _, err = run(["eval", str(out), "--time-stride", "0"], capsys)
    one_line_error(code, err, "--time-stride must be ≥ 1")
    code, outp, _ = run(["sample", str(out), "--num", "2", "--steps", "50", "--length", "16", "--json"], capsys)
    assert code == 0
    code, _, err = run(["sample", str(out), "--num", "1", "--steps", "51"], capsys)
    one_line_error(code, err, "sampler.steps must be ≤")
