"""Samplers beyond the plain ancestral ones: the per-row p(x0) cache, ReMDM, LLaDA's fixed-count
and semi-autoregressive schedules, the uniform-state per-row cache and Duo's greedy tail."""

import pytest
import torch

from dlm.config import RunConfig
from dlm.errors import DlmError
from dlm.families import FAMILIES
from dlm.samplers import (MASKED_SAMPLERS, UNIFORM_SAMPLERS, LLaDASampler, MaskedAncestralSampler, ReMDMSampler,
                          UniformAncestralSampler, filter_logits)
from dlm.samplers.llada import block_steps, transfer_counts
from dlm.samplers.masked_ancestral import NetworkCalls, time_of_alpha
from dlm.samplers.remdm import loop_alpha

V = 11


def tiny(family="mdlm", double=False, time_conditioning=False, vocab=V):
    fam = FAMILIES.get(family)(RunConfig(family=family, time_conditioning=time_conditioning), vocab, eos_id=vocab - 1)
    torch.manual_seed(0)
    model = fam.build_model().eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a non-uniform (random) predictor
    return fam, (model.double() if double else model)


def scattered(batch=3, length=16):
    """Given tokens and clean masks that differ per row: a prompt, a hole's right side, a lone token."""
    g = torch.Generator().manual_seed(5)
    given = torch.randint(0, V - 1, (batch, length), generator=g)
    clean = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        clean[b, : b + 1] = True  # prompts of different lengths
        clean[b, length - 2 - b :] = True  # a right context
        clean[b, 6 + b] = True  # a lone clean token inside the span
    return given, clean


def run(sampler, fam, model, given, clean, seed=1):
    return sampler.sample(model, fam.process, given, clean, torch.Generator().manual_seed(seed), fam.time_conditioned)


MASKED = [
    ("ancestral", {"cache": True}),
    ("ancestral", {"cache": False}),
    ("remdm", {"schedule": "cap", "eta": 0.3}),
    ("remdm", {"schedule": "rescale", "eta": 0.5}),
    ("remdm", {"schedule": "conf", "eta": 1.0}),
    ("remdm", {"schedule": "cap", "eta": 0.2, "loop": True, "t_on": 0.6, "t_off": 0.2}),
    ("llada", {"remasking": "low_confidence"}),
    ("llada", {"remasking": "random", "block_length": 3, "temperature": 0.7}),
]


@pytest.mark.parametrize("name,settings", MASKED)
def test_masked_samplers_keep_clean_leave_no_mask_and_repeat(name, settings):
    fam, model = tiny()
    given, clean = scattered()
    cls = MASKED_SAMPLERS.get(name)
    sampler = cls(cls.Settings(steps=10, **settings))
    x, nfe = run(sampler, fam, model, given, clean)
    assert not (x == fam.process.mask_id).any()
    assert torch.equal(x[clean], given[clean])
    assert int(x.min()) >= 0 and int(x.max()) < V
    assert 1 <= nfe <= 10
    again, _ = run(sampler, fam, model, given, clean)
    assert torch.equal(x, again)
    other, _ = run(sampler, fam, model, given, clean, seed=2)
    assert not torch.equal(x, other)


@pytest.mark.parametrize("name", ["ancestral", "remdm"])
def test_per_row_cache_gives_the_uncached_tokens(name):
    """Float64 network: a row computed alone equals its full-batch logits to far below any
    Gumbel gap, so the tokens must agree exactly; and far fewer rows are computed."""
    fam, model = tiny(double=True)
    given, clean = scattered(batch=3, length=12)
    cls = MASKED_SAMPLERS.get(name)
    extra = {"eta": 0.1} if name == "remdm" else {}
    cached = cls(cls.Settings(steps=24, cache=True, **extra))
    plain = cls(cls.Settings(steps=24, cache=False, **extra))
    x1, nfe1 = run(cached, fam, model, given, clean)
    x2, nfe2 = run(plain, fam, model, given, clean)
    assert torch.equal(x1, x2)
    assert cached.stats["rows"] < plain.stats["rows"] and nfe1 < nfe2
    # each row is computed at most once per step it unmasks something: ≤ its generated tokens (ancestral)
    if name == "ancestral":
        assert cached.stats["rows"] <= int((~clean).sum())


def test_time_conditioned_per_row_cache_gives_the_same_tokens():
    """The per-row evaluation gives each computed row that step's t: exact with time conditioning too."""
    fam, model = tiny(time_conditioning=True)
    given, clean = scattered(batch=2, length=12)
    s = MaskedAncestralSampler.Settings(steps=20)
    x1, _ = run(MaskedAncestralSampler(s), fam, model, given, clean)
    plain = MaskedAncestralSampler(MaskedAncestralSampler.Settings(steps=20, cache=False))
    x2, _ = run(plain, fam, model, given, clean)
    assert torch.equal(x1, x2)


@pytest.mark.parametrize("schedule", ["cap", "rescale", "conf"])
def test_remdm_with_eta_zero_is_the_ancestral_sampler(schedule):
    fam, model = tiny()
    given, clean = scattered()
    for steps in (5, 16):
        ancestral, _ = run(MaskedAncestralSampler(MaskedAncestralSampler.Settings(steps=steps, top_p=0.9)),
                           fam, model, given, clean)
        remdm, _ = run(ReMDMSampler(ReMDMSampler.Settings(steps=steps, top_p=0.9, schedule=schedule, eta=0.0)),
                       fam, model, given, clean)
        assert torch.equal(ancestral, remdm)


class FixedLogits:
    """A stand-in network: the same logits at every position it is asked for."""

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, x, t=None, score_mask=None, pad=None):
        return self.logits.expand(int(score_mask.sum()), -1)


@pytest.mark.parametrize("schedule,eta", [("cap", 0.3), ("rescale", 0.6), ("conf", 1.0)])
def test_remdm_step_draws_from_the_remdm_posterior(schedule, eta):
    """One step from a fixed x_t, drawn many times: masked positions take token k with prob
    (α_s − (1 − σ) α_t)/(1 − α_t) · x_θ,k and stay masked otherwise; decoded positions are
    remasked with prob σ (per position for conf); clean positions never change."""
    fam, _ = tiny(vocab=5)
    p = fam.process
    m = p.mask_id
    n = 40000
    a_t, a_s = 0.4, 0.55
    logits = torch.tensor([1.0, -0.5, 0.3, 2.0, 0.0])
    # each row: [clean 2, masked, decoded 3 (ψ = 0.2), decoded 1 (ψ = 0.9)]
    row = torch.tensor([2, m, 3, 1])
    x = row.expand(n, -1).clone()
    fixed = torch.tensor([True, False, False, False]).expand(n, -1)
    conf = torch.tensor([0.0, 0.0, 0.2, 0.9], dtype=torch.float64).expand(n, -1).clone()
    sampler = ReMDMSampler(ReMDMSampler.Settings(schedule=schedule, eta=eta))
    g = torch.Generator().manual_seed(0)
    out = sampler.step(FixedLogits(logits), p, x, fixed, conf, torch.tensor(a_t, dtype=torch.float64),
                       torch.tensor(a_s, dtype=torch.float64), None, True, False, g, NetworkCalls(n))
    sigma_max = min(1.0, (1 - a_s) / a_t)
    if schedule == "cap":
        sigma_masked = sigma_dec = min(eta, sigma_max)
        sigma_dec = torch.tensor([sigma_dec, sigma_dec], dtype=torch.float64)
    elif schedule == "rescale":
        sigma_masked = eta * sigma_max
        sigma_dec = torch.tensor([sigma_masked, sigma_masked], dtype=torch.float64)
    else:
        sigma_masked = 0.0
        sigma_dec = eta * sigma_max * torch.softmax(-torch.tensor([0.2, 0.9], dtype=torch.float64), 0)
    x_theta = logits.double().softmax(-1)
    expected = torch.cat([(a_s - (1 - sigma_masked) * a_t) / (1 - a_t) * x_theta,
                          torch.tensor([(1 - a_s - sigma_masked * a_t) / (1 - a_t)], dtype=torch.float64)])
    freq = torch.bincount(out[:, 1], minlength=6).double() / n
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)
    assert torch.equal(out[:, 0], x[:, 0])  # clean: never remasked
    for col, tok, sig in ((2, 3, sigma_dec[0]), (3, 1, sigma_dec[1])):
        remasked = (out[:, col] == m).double().mean()
        assert abs(remasked - sig) < 0.01, (col, remasked, sig)
        assert set(out[:, col].unique().tolist()) <= {tok, m}


def test_remdm_loop_schedule_and_settings():
    a = loop_alpha(torch.tensor([1.0, 0.8, 0.55, 0.3, 0.05, 0.0]), 0.55, 0.05, 0.9)
    torch.testing.assert_close(a, torch.tensor([0.0, 0.2 * 0.9 / 0.45, 0.9, 0.9, 0.9, 1.0], dtype=torch.float64))
    fam, model = tiny()
    given, clean = scattered()
    with pytest.raises(DlmError, match="t_off"):
        run(ReMDMSampler(ReMDMSampler.Settings(loop=True, t_on=0.3, t_off=0.4)), fam, model, given, clean)
    # loop with many steps: tokens are remasked and redrawn in the loop phase, none left masked at the end
    s = ReMDMSampler(ReMDMSampler.Settings(steps=20, eta=0.5, loop=True, t_on=0.6, t_off=0.1))
    x, _ = run(s, fam, model, given, clean)
    assert not (x == fam.process.mask_id).any() and torch.equal(x[clean], given[clean])
    # the schedule's inverse, used to give a time-conditioned model its t
    t = torch.tensor([0.0, 0.3, 0.75, 1.0], dtype=torch.float64)
    torch.testing.assert_close(time_of_alpha(fam.process.schedule, fam.process.schedule.alpha(t)), t)


def test_llada_transfer_counts_and_block_steps():
    assert transfer_counts(torch.tensor([10, 3, 0]), 4).tolist() == [[3, 3, 2, 2], [1, 1, 1, 0], [0, 0, 0, 0]]
    assert block_steps(12, 3) == [4, 4, 4] and block_steps(7, 3) == [3, 2, 2] and block_steps(2, 3) == [1, 1, 1]


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_llada_one_block_is_the_plain_schedule(remasking):
    fam, model = tiny()
    given, clean = scattered()
    plain, _ = run(LLaDASampler(LLaDASampler.Settings(steps=5, remasking=remasking)), fam, model, given, clean)
    longest = int((~clean).sum(-1).max())
    for length in (longest, longest + 7):
        one, _ = run(LLaDASampler(LLaDASampler.Settings(steps=5, remasking=remasking, block_length=length)),
                     fam, model, given, clean)
        assert torch.equal(one, plain)
    blocks, _ = run(LLaDASampler(LLaDASampler.Settings(steps=5, remasking=remasking, block_length=2)),
                    fam, model, given, clean)
    assert not torch.equal(blocks, plain)


class Recorder:
    """The model, recording the tokens of every call (all rows are asked in these tests)."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def __call__(self, x, t=None, score_mask=None, pad=None):
        self.seen.append(x.clone())
        return self.model(x, t, score_mask=score_mask, pad=pad)


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_llada_decodes_the_scheduled_number_per_step_block_by_block(remasking):
    fam, model = tiny()
    m = fam.process.mask_id
    given = torch.zeros(2, 13, dtype=torch.long)
    clean = torch.zeros(2, 13, dtype=torch.bool)
    clean[0, :3] = True  # row 0: a prompt of 3, targets 3–12
    clean[1, :2] = clean[1, 7] = True  # row 1: a prompt of 2 and a clean token inside: targets 2–6, 8–12
    targets = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [2, 3, 4, 5, 6, 8, 9, 10, 11, 12]]
    # plain: 10 targets in 4 steps → 3, 3, 2, 2
    rec = Recorder(model)
    sampler = LLaDASampler(LLaDASampler.Settings(steps=4, remasking=remasking))
    x, nfe = sampler.sample(rec, fam.process, given, clean, torch.Generator().manual_seed(0), False)
    states = rec.seen + [x]
    decoded = [((states[i] == m) & (states[i + 1] != m)).sum(-1).tolist() for i in range(4)]
    assert decoded == [[3, 3], [3, 3], [2, 2], [2, 2]] and nfe == 4
    # blocks of 4 targets: 4, 4, 2; 6 steps → 2 per block → 2, 2 | 2, 2 | 1, 1
    rec = Recorder(model)
    sampler = LLaDASampler(LLaDASampler.Settings(steps=6, remasking=remasking, block_length=4))
    x, nfe = sampler.sample(rec, fam.process, given, clean, torch.Generator().manual_seed(0), False)
    states = rec.seen + [x]
    decoded = [((states[i] == m) & (states[i + 1] != m)).sum(-1).tolist() for i in range(6)]
    assert decoded == [[2, 2], [2, 2], [2, 2], [2, 2], [1, 1], [1, 1]] and nfe == 6
    for i in range(6):  # block b = i // 2: only its targets change, and the later ones are all still masked
        b = i // 2
        for r in range(2):
            changed = ((states[i] == m) & (states[i + 1] != m))[r].nonzero()[:, 0].tolist()
            assert set(changed) <= set(targets[r][4 * b: 4 * b + 4])
            assert bool((states[i + 1][r, targets[r][4 * b + 4:]] == m).all())
        assert torch.equal(states[i + 1][clean], given[clean])
    assert not (x == m).any()


def test_llada_low_confidence_keeps_the_most_confident_draws():
    """At temperature 0 each position draws its argmax, and the k kept at a step are the
    positions whose argmax probability is highest (a stand-in network with clearly ranked
    per-position logits)."""
    fam, _ = tiny()
    L = 10
    g = torch.Generator().manual_seed(3)
    table = torch.randn(L, V, generator=g) * 3  # (L, V) logits of each position, whatever the input
    top = table.softmax(-1).max(-1).values
    seen = []

    def net(x, t=None, score_mask=None, pad=None):
        seen.append(x.clone())
        return table.expand(x.shape[0], L, V)[score_mask]

    sampler = LLaDASampler(LLaDASampler.Settings(steps=5, temperature=0))
    given, clean = torch.zeros(1, L, dtype=torch.long), torch.zeros(1, L, dtype=torch.bool)
    x, _ = sampler.sample(net, fam.process, given, clean, torch.Generator().manual_seed(0), False)
    assert torch.equal(x[0], table.argmax(-1))
    order = top.argsort(descending=True).tolist()  # 2 per step, most confident first
    for j in range(1, 5):
        kept = (seen[j][0] != fam.process.mask_id).nonzero()[:, 0].tolist()
        assert set(kept) == set(order[: 2 * j])


def test_uniform_per_row_cache_gives_the_uncached_tokens():
    fam, model = tiny("usdm", double=True, vocab=20)
    given, clean = scattered(batch=3, length=10)
    given = given % 20
    settings = dict(steps=30, temperature=1.0, top_p=0.9)
    cached = UniformAncestralSampler(UniformAncestralSampler.Settings(cache=True, **settings))
    plain = UniformAncestralSampler(UniformAncestralSampler.Settings(cache=False, **settings))
    x1, nfe1 = run(cached, fam, model, given, clean)
    x2, nfe2 = run(plain, fam, model, given, clean)
    assert torch.equal(x1, x2) and torch.equal(x1[clean], given[clean])
    assert nfe2 == 30 and nfe1 < nfe2 and cached.stats["rows"] < plain.stats["rows"]


def test_uniform_greedy_tail_is_duos_argmax_after_the_last_draw():
    fam, model = tiny("usdm", time_conditioning=True, vocab=20)
    given, clean = scattered(batch=3, length=10)
    given = given % 20
    base = dict(steps=6, greedy_last=False)
    drawn, nfe = run(UniformAncestralSampler(UniformAncestralSampler.Settings(**base)), fam, model, given, clean)
    tail, nfe_tail = run(UniformAncestralSampler(UniformAncestralSampler.Settings(greedy_tail=True, **base)),
                         fam, model, given, clean)
    assert nfe == 6 and nfe_tail == 7  # time-conditioned: every row at every step, plus the tail
    with torch.no_grad():
        argmax = model(drawn, torch.zeros(3), score_mask=~clean).argmax(-1)
    assert torch.equal(tail[~clean], argmax) and torch.equal(tail[clean], given[clean])
    # the tail never draws: its output is the same at any temperature / top-p (the draws before it are)
    filtered = filter_logits(torch.tensor([[0.1, 2.0, -1.0]]), UniformAncestralSampler.Settings(top_p=0.5))
    assert int(filtered.argmax()) == 1


def test_samplers_are_registered_and_settings_checked():
    from dlm.config import ComponentConfig
    from dlm.families.base import component_settings

    assert MASKED_SAMPLERS.get("remdm") is ReMDMSampler and MASKED_SAMPLERS.get("llada") is LLaDASampler
    assert UNIFORM_SAMPLERS.get("ancestral") is UniformAncestralSampler
    _, s = component_settings(MASKED_SAMPLERS, ComponentConfig("remdm", {"schedule": "conf", "eta": 0.5}), "ancestral",
                              "sampler")
    assert s.schedule == "conf" and s.eta == 0.5
    with pytest.raises(DlmError, match="schedule"):
        component_settings(MASKED_SAMPLERS, ComponentConfig("remdm", {"schedule": "max"}), "ancestral", "sampler")
    with pytest.raises(DlmError, match="eta"):
        component_settings(MASKED_SAMPLERS, ComponentConfig("remdm", {"eta": 1.5}), "ancestral", "sampler")
    with pytest.raises(DlmError, match="remasking"):
        component_settings(MASKED_SAMPLERS, ComponentConfig("llada", {"remasking": "topk"}), "ancestral", "sampler")


def test_per_row_cache_under_guidance_gives_the_uncached_tokens():
    """A guided model (classifier-free guidance wrapper) asked for a subset of rows hides the
    clean tokens of those rows: the same tokens as the whole-batch sampler."""
    from dlm.config import ComponentConfig

    fam, model = tiny(double=True)
    given, clean = scattered(batch=3, length=12)
    out = []
    for cache in (True, False):
        fam.choose_sampler(ComponentConfig("ancestral", {"steps": 12, "guidance": 1.5, "cache": cache}))
        out.append(fam.sample(model, given, clean, torch.Generator().manual_seed(0))[0])
    assert torch.equal(out[0], out[1])
