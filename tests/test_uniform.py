import math

import numpy as np
import pytest
import torch

from dlm.batch import Batch
from dlm.config import ComponentConfig, RunConfig
from dlm.families import FAMILIES
from dlm.objectives import UNIFORM_OBJECTIVES, Corrupted, UniformNelbo
from dlm.processes import UniformProcess
from dlm.samplers import SamplingOptions
from dlm.schedules import get_schedule

V = 7


def process(name="loglinear", vocab=V):
    return UniformProcess(vocab, get_schedule(name))


@pytest.mark.parametrize("name", ["loglinear", "cosine"])
def test_replaced_fraction_matches_alpha(name, gen):
    p = process(name)
    x0 = torch.randint(0, V, (4, 40000), generator=gen)
    t = torch.tensor([0.2, 0.4, 0.6, 0.9])
    xt = p.corrupt(x0, t, gen)
    changed = (xt != x0).double().mean(1)
    expected = (1 - p.schedule.alpha(t).double()) * (1 - 1 / V)
    assert torch.allclose(changed, expected, atol=0.01), (changed, expected)
    # the replacement is drawn uniformly from the whole vocabulary, x0 included
    zeros = torch.zeros(1, 70000, dtype=torch.long)
    a = float(p.schedule.alpha(torch.tensor(0.9)))
    freq = torch.bincount(p.corrupt(zeros, torch.tensor([0.9]), gen)[0], minlength=V).double() / zeros.numel()
    expected = torch.full((V,), (1 - a) / V, dtype=torch.float64)
    expected[0] += a
    assert torch.allclose(freq, expected, atol=0.006), (freq, expected)


def test_ends_of_the_forward_process(gen):
    p = process()
    x0 = torch.randint(0, V, (3, 5000), generator=gen)
    assert torch.equal(p.corrupt(x0, torch.zeros(3), gen), x0)
    x1 = p.corrupt(x0, torch.ones(3), gen)  # pure noise, independent of x0
    assert abs((x1 == x0).double().mean().item() - 1 / V) < 0.01


def brute_force_posterior(x0_probs, xt, a_t, a_s):
    """Bayes' rule with explicit V×V transition matrices."""
    I = torch.eye(V, dtype=torch.float64)
    Q_ts = (a_t / a_s) * I + (1 - a_t / a_s) / V  # q(x_t = j | x_s = k) at [k, j]
    q_s = a_s * x0_probs + (1 - a_s) / V  # q(x_s | x)
    joint = Q_ts[:, xt] * q_s
    return joint / joint.sum()


@pytest.mark.parametrize("a_t,a_s", [(0.3, 0.7), (0.05, 0.06), (0.0, 0.4), (0.5, 1.0), (0.6, 0.6)])
def test_posterior_matches_bayes_rule_and_sums_to_one(a_t, a_s, gen):
    p = process()
    x = torch.rand(5, V, generator=gen, dtype=torch.float64)
    x = x / x.sum(-1, keepdim=True)
    x[0] = torch.nn.functional.one_hot(torch.tensor(2), V).double()  # a one-hot x0 too
    xt = torch.randint(0, V, (5,), generator=gen)
    post = p.posterior(xt, x, torch.tensor(a_t, dtype=torch.float64), torch.tensor(a_s, dtype=torch.float64))
    assert torch.allclose(post.sum(-1), torch.ones(5, dtype=torch.float64))
    for b in range(5):
        assert torch.allclose(post[b], brute_force_posterior(x[b], xt[b], a_t, a_s), atol=1e-12)


def test_posterior_at_the_ends(gen):
    p = process()
    x = torch.softmax(torch.randn(4, V, generator=gen, dtype=torch.float64), -1)
    xt = torch.randint(0, V, (4,), generator=gen)
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    # s = t: nothing happens between them, x_s = x_t
    assert torch.allclose(p.posterior(xt, x, f64(0.4), f64(0.4)), torch.nn.functional.one_hot(xt, V).double())
    # t = 1: x_t is pure noise and says nothing, the posterior is the forward marginal q(x_s | x)
    for a_s in (0.2, 0.9):
        assert torch.allclose(p.posterior(xt, x, f64(0.0), f64(a_s)), a_s * x + (1 - a_s) / V)
    # s = 0 with a one-hot x0: the posterior is x0
    x0 = torch.nn.functional.one_hot(torch.tensor([1, 3, 0, 6]), V).double()
    assert torch.allclose(p.posterior(xt, x0, f64(0.3), f64(1.0)), x0)


def exact_nelbo(schedule: str, p_data: torch.Tensor, denoiser) -> float:
    """∫₀¹ E_{x0, x_t} f_t dt for a one-token sequence, by Gauss–Legendre quadrature over t and
    exact sums over x0 and x_t; ``denoiser(t, post)`` gives x_θ for every x_t from the exact
    posterior p(x0 | x_t) (a (V, V) table, row x_t)."""
    p = process(schedule, len(p_data))
    n = len(p_data)
    obj = UniformNelbo()
    nodes, weights = np.polynomial.legendre.leggauss(200)
    x0 = torch.arange(n).repeat_interleave(n)[:, None]  # all (x0, x_t) pairs as a batch of L = 1
    xt = torch.arange(n).repeat(n)[:, None]
    total = 0.0
    for node, w in zip(nodes, weights):
        t = torch.tensor((node + 1) / 2, dtype=torch.float64)
        a = p.schedule.alpha(t)
        q = a * torch.eye(n, dtype=torch.float64) + (1 - a) / n  # q(x_t | x0) at [x0, x_t]
        joint = p_data[:, None] * q
        post = (joint / joint.sum(0, keepdim=True)).T  # p(x0 | x_t) at [x_t, x0]
        x_theta = denoiser(t, post)[xt[:, 0]]
        f = obj.per_position(x_theta.log(), x0[:, 0], xt[:, 0], t.expand(n * n).float(), p)
        total += w / 2 * float((joint.reshape(-1) * f).sum())
    return total


P_DATA = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.03, 0.01], dtype=torch.float64)
H_DATA = float(-(P_DATA * P_DATA.log()).sum())


@pytest.mark.parametrize("schedule", ["loglinear", "cosine"])
def test_nelbo_is_tight_for_the_exact_reverse_process(schedule):
    """For one token the exact reverse transition is q(x_s | x_t, x = p_data): plugging the
    data distribution in as x_θ makes the model's reverse process the true one, and the
    continuous-time NELBO must equal the entropy of the data, no more, no less."""
    nelbo = exact_nelbo(schedule, P_DATA, lambda t, post: P_DATA.expand(len(P_DATA), -1))
    assert nelbo == pytest.approx(H_DATA, abs=2e-4)


@pytest.mark.parametrize("denoiser", ["uniform", "posterior-mean", "peaked"])
def test_nelbo_of_other_denoisers_is_above_the_entropy(denoiser):
    n = len(P_DATA)
    table = {
        "uniform": lambda t, post: torch.full((n, n), 1 / n, dtype=torch.float64),
        "posterior-mean": lambda t, post: post.clamp_min(1e-12),
        "peaked": lambda t, post: torch.softmax(3 * P_DATA.log(), 0).expand(n, -1),
    }[denoiser]
    nelbo = exact_nelbo("loglinear", P_DATA, table)
    assert nelbo > H_DATA + 1e-3
    if denoiser == "uniform":
        assert nelbo == pytest.approx(math.log(n), abs=2e-4)  # a uniform model pays log V exactly


def family(objective, vocab=50, **settings):
    cfg = RunConfig(family="usdm", objective=ComponentConfig(objective, settings))
    return FAMILIES.get("usdm")(cfg, vocab, 0)


@pytest.mark.parametrize("objective", ["nelbo", "naive", "sddlm", "sddlm-v1", "sddlm-v2"])
def test_every_objective_has_a_finite_gradient(objective, gen):
    fam = family(objective, **({"negatives": 3} if objective == "sddlm-v1" else {}))
    model = fam.build_model()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # not the zero-init head: a real gradient
    x0 = torch.randint(0, 50, (4, 16), generator=gen)
    loss = fam.loss(model, Batch(x0), gen).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_registry_lists_the_papers_objectives():
    assert set(UNIFORM_OBJECTIVES.names()) >= {"nelbo", "naive", "sddlm", "sddlm-v1", "sddlm-v2"}


def _loss_with_logits(objective, logits, x0, xt, gen, **settings):
    fam = family(objective, vocab=logits.shape[-1], **settings)
    c = Corrupted(x0, xt, torch.full((x0.shape[0],), 0.5), torch.ones_like(x0, dtype=torch.bool), xt != x0)
    c = fam.objective.draw(c, gen, fam.process)
    where = fam.objective.score_mask(c)
    return fam.objective(logits[where], c, where, fam.process).mean()


@pytest.mark.parametrize("objective", ["sddlm", "sddlm-v1", "sddlm-v2"])
def test_sddlm_ignores_unchanged_positions(objective, gen):
    x0 = torch.randint(0, 30, (3, 20), generator=gen)
    xt = x0.clone()
    xt[:, ::3] = (x0[:, ::3] + 1) % 30  # replaced positions
    logits = torch.randn(3, 20, 30, generator=gen)
    other = logits.clone()
    other[:, 1::3] = torch.randn(3, 7, 30, generator=gen) * 5  # change the output where x_t = x0
    a = _loss_with_logits(objective, logits, x0, xt, torch.Generator().manual_seed(1))
    b = _loss_with_logits(objective, other, x0, xt, torch.Generator().manual_seed(1))
    assert a == b
    changed = logits.clone()
    changed[:, ::3] += torch.randn(3, 7, 30, generator=gen)  # where noise replaced: the loss moves
    assert _loss_with_logits(objective, changed, x0, xt, torch.Generator().manual_seed(1)) != a
    # the naive loss, by contrast, scores every position
    assert _loss_with_logits("naive", logits, x0, xt, gen) != _loss_with_logits("naive", other, x0, xt, gen)


def test_sddlm_is_the_mean_cross_entropy_over_replaced_tokens(gen):
    x0 = torch.randint(0, 30, (2, 10), generator=gen)
    xt = x0.clone()
    xt[0, :3] = (x0[0, :3] + 5) % 30
    xt[1, 4] = (x0[1, 4] + 5) % 30
    logits = torch.randn(2, 10, 30, generator=gen)
    changed = xt != x0
    expected = torch.nn.functional.cross_entropy(logits[changed], x0[changed])
    assert _loss_with_logits("sddlm", logits, x0, xt, gen) == pytest.approx(float(expected), rel=1e-6)


def test_regularisers_push_the_negatives_down(gen):
    x0 = torch.randint(0, 30, (2, 12), generator=gen)
    xt = (x0 + 7) % 30  # every position replaced
    logits = torch.randn(2, 12, 30, generator=gen, requires_grad=True)
    lam, eps = 0.5, 1e-3
    loss = _loss_with_logits("sddlm-v2", logits, x0, xt, gen, reg_weight=lam, reg_eps=eps)
    logp = logits.log_softmax(-1)
    ce = -logp.gather(-1, x0[..., None]).mean()
    reg = torch.log(logp.gather(-1, xt[..., None]).exp() + eps).mean()
    assert float(loss.detach()) == pytest.approx(float((ce + lam * reg).detach()), rel=1e-5)
    loss.backward()
    grad_at_xt = logits.grad.gather(-1, xt[..., None])
    plain = torch.randn(2, 12, 30, generator=gen)
    plain.copy_(logits.detach())
    plain.requires_grad_(True)
    _loss_with_logits("sddlm", plain, x0, xt, gen).backward()
    # gradient descent lowers the noisy token's logit more with the V2 regulariser than without
    assert (grad_at_xt > plain.grad.gather(-1, xt[..., None])).all()
    # V1 never uses the target itself as a negative
    fam = family("sddlm-v1", vocab=3, negatives=50)
    zeros = torch.zeros(1, 4, dtype=torch.long)
    c = fam.objective.draw(Corrupted(zeros, zeros + 1, torch.zeros(1), zeros == 0), gen, fam.process)
    neg = c.negatives
    assert neg.shape == (1, 4, 50) and set(neg.unique().tolist()) == {0, 1, 2}  # drawn uniformly; x0 masked out in the loss


def test_bad_regulariser_settings_are_refused():
    from dlm.errors import DlmError

    with pytest.raises(DlmError, match="reg_eps"):
        family("sddlm-v1", reg_eps=0.0)
    with pytest.raises(DlmError, match="negatives"):
        family("sddlm-v1", negatives=0)


@pytest.mark.parametrize("steps", [1, 5])
def test_sampler_keeps_the_prompt_and_self_corrects(steps, gen):
    fam = family("sddlm", vocab=40)
    model = fam.build_model().eval()
    torch.nn.init.normal_(model.head.weight, std=1.0)
    prompt = torch.tensor([3, 1, 4])
    opts = SamplingOptions(steps=steps, temperature=1.0, top_p=0.9)
    x, nfe = fam.generate(model, 3, 24, prompt, gen, opts)
    assert x.shape == (3, 24) and nfe == steps
    assert torch.equal(x[:, :3], prompt.expand(3, -1))
    assert int(x.min()) >= 0 and int(x.max()) < 40


def test_sampler_last_step_is_greedy_and_positions_change_along_the_way():
    """With a model that always predicts one token strongly, the greedy last step lands on
    it everywhere, and intermediate steps move tokens that an earlier step had already
    placed (self-correction: nothing is frozen once drawn)."""
    from dlm.samplers import UniformAncestralSampler

    fam = family("sddlm", vocab=20)
    model = fam.build_model().eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[7] = 6.0
    sampler = UniformAncestralSampler(UniformAncestralSampler.Settings(steps=6))
    seen = []
    draw = sampler._draw
    sampler._draw = lambda logits, xt, *rest: seen.append(xt.clone()) or draw(logits, xt, *rest)
    given, clean = torch.zeros(4, 32, dtype=torch.long), torch.zeros(4, 32, dtype=torch.bool)
    x, nfe = sampler.sample(model, fam.process, given, clean, torch.Generator().manual_seed(0), True)
    assert bool((x == 7).all()) and nfe == 6
    history = torch.stack(seen)  # (5, N): the tokens before each non-greedy step
    assert bool(((history[1:] != history[:-1]) & (history[:-1] == 7)).any())  # a 7 drawn earlier moved again


def test_eval_in_row_chunks_gives_the_same_bound(monkeypatch):
    fam = family("nelbo")
    model = fam.build_model().eval()
    torch.nn.init.normal_(model.head.weight, std=0.3)
    x0 = torch.randint(0, 50, (6, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = fam.nll(model, Batch(x0), torch.Generator().manual_seed(1), 2)
        monkeypatch.setattr(fam, "eval_chunk", 16 * 50 * 2)  # two rows at a time
        chunked = fam.nll(model, Batch(x0), torch.Generator().manual_seed(1), 2)
    assert torch.allclose(whole, chunked)
    assert (whole / 16 > 0).all()


def test_sddlm_where_noised_scores_every_resampled_position(gen):
    fam = family("sddlm", vocab=5, where="noised")
    x0 = torch.randint(0, 5, (8, 400), generator=gen)
    xt, noised = fam.process.corrupt_with_noise(x0, torch.full((8,), 0.7), gen)
    c = Corrupted(x0, xt, torch.full((8,), 0.7), torch.ones_like(x0, dtype=torch.bool), noised)
    where = fam.objective.score_mask(c)
    assert torch.equal(where, noised)
    assert bool((where & (xt == x0)).any())  # redrawn as itself: scored under "noised" …
    changed = family("sddlm", vocab=5).objective.score_mask(c)
    assert not bool((changed & (xt == x0)).any())  # … never under "changed"
    with pytest.raises(Exception, match="objective.where"):
        family("sddlm", where="everywhere")


def test_what_each_cross_entropy_converges_to_under_the_bound():
    """For one token, the minimiser of the cross-entropy over *noised* positions is p(x0)
    (x_t is independent of x0 there): the exact reverse process, NELBO = H. Over *changed*
    positions it is p(x0 | x0 ≠ x_t): no mass on the input token, and the bound pays for
    every kept token. Over *all* positions (naive) it is the posterior p(x0 | x_t), which the
    plug-in posterior counts twice."""
    n = len(P_DATA)
    no_own = P_DATA.expand(n, n).clone()
    no_own[torch.arange(n), torch.arange(n)] = 1e-6
    no_own = no_own / no_own.sum(-1, keepdim=True)
    changed = exact_nelbo("loglinear", P_DATA, lambda t, post: no_own)
    naive = exact_nelbo("loglinear", P_DATA, lambda t, post: post.clamp_min(1e-12))
    assert changed > H_DATA + 1.0 and naive > H_DATA + 0.3


@pytest.mark.parametrize("options", [SamplingOptions(), SamplingOptions(temperature=0.7, top_p=0.8)])
@pytest.mark.parametrize("a_t,a_s", [(0.0, 0.3), (0.4, 0.55), (0.9, 0.97)])
def test_sampler_step_draws_from_the_posterior(options, a_t, a_s):
    """The mixture draw (keep / from x_θ / uniform) has exactly the posterior's distribution."""
    from dlm.samplers import UniformAncestralSampler, filter_logits

    p = process(vocab=5)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, generator=g) * 2
    xt = torch.tensor([0, 3, 4])
    n = 60000
    sampler = UniformAncestralSampler(options)
    draws = sampler._draw(logits.repeat_interleave(n, 0), xt.repeat_interleave(n), torch.tensor(a_t),
                          torch.tensor(a_s), p, g).view(3, n)
    x_theta = filter_logits(logits, options).softmax(-1)
    post = p.posterior(xt, x_theta, torch.tensor(a_t, dtype=torch.float64), torch.tensor(a_s, dtype=torch.float64))
    for b in range(3):
        freq = torch.bincount(draws[b], minlength=5).double() / n
        assert torch.allclose(freq, post[b], atol=0.008), (b, freq, post[b])
