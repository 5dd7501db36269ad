import math

import pytest
import torch

from dlm.config import RunConfig
from dlm.families import FAMILIES
from dlm.objectives import LLaDACrossEntropy, MDLMNelbo
from dlm.processes import MaskedProcess, low_discrepancy
from dlm.batch import Batch
from dlm.samplers import SamplingOptions
from dlm.schedules import get_schedule
from helpers import score

V = 11


def process(name="loglinear"):
    return MaskedProcess(V, get_schedule(name))


@pytest.mark.parametrize("name", ["loglinear", "cosine", "linear", "geometric"])
def test_corruption_at_t0_is_identity_and_at_t1_all_mask(name, gen):
    p = process(name)
    x0 = torch.randint(0, V, (8, 50), generator=gen)
    assert torch.equal(p.corrupt(x0, torch.zeros(8), gen), x0)
    assert torch.all(p.corrupt(x0, torch.ones(8), gen) == p.mask_id)


def test_masked_fraction_matches_alpha(gen):
    p = process("cosine")
    x0 = torch.randint(0, V, (4, 20000), generator=gen)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    frac = (p.corrupt(x0, t, gen) == p.mask_id).float().mean(1)
    expected = 1 - p.schedule.alpha(t)
    assert torch.allclose(frac, expected, atol=0.015)


def test_unmasked_positions_keep_x0(gen):
    p = process()
    x0 = torch.randint(0, V, (4, 100), generator=gen)
    xt = p.corrupt(x0, torch.full((4,), 0.5), gen)
    keep = xt != p.mask_id
    assert torch.equal(xt[keep], x0[keep])


def test_unmask_probability_is_one_at_the_last_step():
    p = process("cosine")
    assert p.unmask_probability(torch.tensor(0.3), torch.tensor(0.0)).item() == 1.0
    assert 0 < p.unmask_probability(torch.tensor(0.6), torch.tensor(0.5)).item() < 1


def test_low_discrepancy_draws_cover_the_interval(gen):
    u = low_discrepancy(8, gen, "cpu")
    assert u.min() >= 0 and u.max() < 1
    gaps = torch.sort(u).values.diff()
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / 8))


def nelbo_of(logits, x0, xt, t, p):
    """The objective scored from full (B, L, V) logits, the way the family calls it."""
    return score(MDLMNelbo(), logits, x0, xt, t, p).nats


def test_nelbo_equals_weighted_masked_cross_entropy(gen):
    p = process("cosine")
    x0 = torch.randint(0, V, (3, 30), generator=gen)
    t = torch.tensor([0.3, 0.5, 0.9])
    xt = p.corrupt(x0, t, gen)
    logits = torch.randn(3, 30, V, generator=gen)
    ce = -torch.log_softmax(logits, -1).gather(-1, x0[..., None])[..., 0]  # (B, L)
    expected = p.schedule.weight(t) * (ce * (xt == p.mask_id)).sum(-1)
    torch.testing.assert_close(nelbo_of(logits, x0, xt, t, p), expected)


def test_nelbo_ignores_unmasked_positions(gen):
    """Changing the model's output where x_t is not masked leaves the loss unchanged."""
    p = process()
    x0 = torch.randint(0, V, (3, 30), generator=gen)
    t = torch.tensor([0.3, 0.5, 0.9])
    xt = p.corrupt(x0, t, gen)
    logits = torch.randn(3, 30, V, generator=gen)
    other = logits.clone()
    unmasked = xt != p.mask_id
    other[unmasked] = torch.randn(int(unmasked.sum()), V, generator=gen) * 5
    torch.testing.assert_close(nelbo_of(logits, x0, xt, t, p), nelbo_of(other, x0, xt, t, p))
    changed = logits.clone()
    changed[~unmasked] += torch.randn(int((~unmasked).sum()), V, generator=gen)
    assert not torch.allclose(nelbo_of(logits, x0, xt, t, p), nelbo_of(changed, x0, xt, t, p))


def test_nelbo_of_a_uniform_model_is_log_v_per_token(gen):
    """With p_θ uniform, E_t[w(t) · #masked · log V] = L · log V for any schedule."""
    for name in ["loglinear", "cosine"]:
        p = process(name)
        x0 = torch.randint(0, V, (4096, 16), generator=gen)
        t = 1e-4 + (1 - 1e-4) * low_discrepancy(4096, gen, "cpu")
        xt = p.corrupt(x0, t, gen)
        per_seq = nelbo_of(torch.zeros(4096, 16, V), x0, xt, t, p)
        assert per_seq.mean().item() / 16 == pytest.approx(math.log(V), rel=0.03)


def test_llada_equals_nelbo_for_loglinear(gen):
    p = process("loglinear")
    x0 = torch.randint(0, V, (4, 20), generator=gen)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    xt = p.corrupt(x0, t, gen)
    logits = torch.randn(4, 20, V, generator=gen)
    llada = score(LLaDACrossEntropy(), logits, x0, xt, t, p).nats
    torch.testing.assert_close(llada, nelbo_of(logits, x0, xt, t, p))


def tiny_mdlm(time_conditioning=None):
    cfg = RunConfig(family="mdlm", time_conditioning=time_conditioning)
    fam = FAMILIES.get("mdlm")(cfg, V, eos_id=V - 1)
    torch.manual_seed(0)
    model = fam.build_model().eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a non-uniform (random) predictor
    return fam, model


@pytest.mark.parametrize("steps", [1, 3, 17, 200])
def test_sampler_leaves_no_mask_and_keeps_prompt(steps, gen):
    fam, model = tiny_mdlm()
    prompt = torch.tensor([1, 2, 3])
    x, nfe = fam.generate(model, 3, 24, prompt, gen, SamplingOptions(steps=steps))
    assert x.shape == (3, 24)
    assert not (x == fam.process.mask_id).any()
    assert torch.all(x[:, :3] == prompt)
    assert 1 <= nfe <= steps


def test_cache_skips_calls_without_changing_samples():
    fam, model = tiny_mdlm()
    given, clean = torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, 16, dtype=torch.bool)
    sampler = fam.sampler(fam.sampler_cls.Settings(steps=256, cache=True))
    cached, nfe_cached = sampler.sample(model, fam.process, given, clean, torch.Generator().manual_seed(1), False)
    sampler.settings.cache = False
    plain, nfe_plain = sampler.sample(model, fam.process, given, clean, torch.Generator().manual_seed(1), False)
    assert torch.equal(cached, plain)
    # a call is needed only after a step that unmasked something: ≤ one per token of the batch
    assert nfe_cached <= 2 * 16 + 1 < nfe_plain


def test_time_conditioned_sampler_runs_every_step(gen):
    fam, model = tiny_mdlm(time_conditioning=True)
    # 2 × 64 tokens over 5 steps: masks remain until the last step, so every step calls the net
    x, nfe = fam.generate(model, 2, 64, None, gen, fam.sampler_cls.Settings(steps=5))
    assert not (x == fam.process.mask_id).any()
    assert nfe == 5


def test_corrupt_count_masks_exactly_k(gen):
    p = process()
    x0 = torch.randint(0, V, (5, 40), generator=gen)
    k = torch.tensor([1, 7, 20, 39, 40])
    xt = p.corrupt_count(x0, k, gen)
    assert torch.equal((xt == p.mask_id).sum(-1), k)
    keep = xt != p.mask_id
    assert torch.equal(xt[keep], x0[keep])


def test_time_and_count_estimators_agree_with_the_exact_nelbo():
    """For a model that does not see t, the continuous-time NELBO of any schedule equals
    Σ_k E_{|S|=k}[mean_{l∈S} CE_l], computed here exactly by enumerating every mask set S;
    both Monte Carlo estimators (over t, over k) must agree with it."""
    from itertools import combinations

    from dlm.objectives import CountNelbo

    L = 6
    fam, model = tiny_mdlm()
    p = fam.process
    x0 = torch.randint(0, V, (1, L), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        exact = 0.0
        for k in range(1, L + 1):
            sets = list(combinations(range(L), k))
            xt = x0.repeat(len(sets), 1)
            for row, s in enumerate(sets):
                xt[row, list(s)] = p.mask_id
            exact += (score(CountNelbo(), model(xt), x0.expand_as(xt), xt, None, p).nats / L).mean().item()

        n = 16_000
        g = torch.Generator().manual_seed(4)
        for name in ["loglinear", "cosine"]:
            p.schedule = get_schedule(name)
            for objective in (MDLMNelbo(), CountNelbo()):
                frac = torch.rand(n, generator=g)
                c = fam.corrupt(objective, Batch(x0.expand(n, L)), frac, g, 1e-6)
                where = objective.score_mask(c)
                vals = objective(model(c.xt, score_mask=where), c, where, p).nats.double()
                mean, se = vals.mean().item(), vals.std().item() / n**0.5
                assert abs(mean - exact) < 4 * se + 1e-3, (name, objective.name, mean, exact, se)
