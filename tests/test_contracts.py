"""Every registered component held to its contract (diffusers' ``SchedulerCommonTest`` pattern):
the tests are parametrised over the registries themselves, so a process, objective or sampler
registered tomorrow is checked here without anyone writing a test for it.

* a **process** corrupts the way ``processes/base.py`` says: identity at t = 0, its prior's
  marginal at t = 1, P(x_t = x0) = α_t + (1 − α_t)·prior(x0) in between, ``fixed`` positions
  untouched and the noise elsewhere independent of them, repeatable under a seed (a process
  whose state is vectors, ``vector_state``, is held to its own ``moments`` and clean state
  ``embed(x0)`` instead);
* an **objective** gives per-sequence nats and counts that are finite, differentiable,
  repeatable, blind to padding, and additive over rows (the global-batch contract: the rows of
  one rank are the same rows of the whole batch), and a one-pass objective chunks exactly;
* a **sampler** returns tokens of the data vocabulary (no absorbing state left), keeps every
  clean position as given, and repeats under a seed;
* every registered component is reachable through some family (else nothing would ever run
  it), and every family's defaults exist.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dlm.batch import Batch
from dlm.families import FAMILIES
from dlm.objectives import OBJECTIVES
from dlm.processes import PROCESSES
from dlm.samplers import SAMPLERS
from dlm.schedules import get_schedule
from dlm.schema import ModelConfig, RunConfig
from dlm.settings import ComponentConfig, check_settings

V, B, L = 11, 4, 12


def family_for(process: str):
    """(family class, the process: choice) of a family that offers ``process``."""
    for name in FAMILIES.names():
        cls = FAMILIES.get(name)
        if not cls.process_choices and process == "causal":
            return cls, None
        for choice, key in cls.process_choices.items():
            if key == process:
                return cls, choice
    return None, None


def build(process: str, objective: str | None = None, sampler: str | None = None, **train):
    cls, choice = family_for(process)
    cfg = RunConfig(family=cls.name, model=ModelConfig(size="tiny", n_layer=1, d_model=32, n_head=2, cond_dim=16))
    if choice is not None and cls.processes is not None:
        cfg.process = ComponentConfig(choice, {"steps": 20} if "steps" in _fields(cls.processes.get(choice)) else {})
    cfg.objective = ComponentConfig(objective)
    cfg.sampler = ComponentConfig(sampler)
    for key, value in train.items():
        setattr(cfg.train, key, value)
    cls.resolve(cfg)
    fam = cls(cfg, V, 0)
    torch.manual_seed(0)
    model = fam.build_model()
    return fam, model


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls.Settings)}


def batch() -> Batch:
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, V, (B, L), generator=g)
    clean = torch.zeros(B, L, dtype=torch.bool)
    clean[:, :3] = True  # a prompt
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, -4:] = True  # one row padded at its end
    return Batch(x0, clean, pad)


# ---- processes -------------------------------------------------------------------------------

def make_process(name: str):
    cls = PROCESSES.get(name)
    settings = cls.Settings(**({"steps": 50} if "steps" in _fields(cls) else {}))
    check_settings(settings)
    return cls(V, get_schedule("loglinear"), settings)


def prior_marginal(process, n=40000) -> torch.Tensor:
    draws = process.prior((n,), torch.Generator().manual_seed(3), "cpu")
    return torch.bincount(draws, minlength=process.input_vocab_size).double() / n


@pytest.mark.parametrize("name", PROCESSES.names())
def test_process_prior_is_in_its_input_vocabulary(name):
    process = make_process(name)
    x1 = process.prior((B, L), torch.Generator().manual_seed(0), "cpu")
    if process.vector_state:  # vectors (B, L, C): finite and repeatable
        assert x1.shape[:2] == (B, L) and x1.dim() == 3 and bool(torch.isfinite(x1).all())
        assert torch.equal(x1, process.prior((B, L), torch.Generator().manual_seed(0), "cpu"))
        return
    assert x1.shape == (B, L) and x1.dtype == torch.long
    assert int(x1.min()) >= 0 and int(x1.max()) < process.input_vocab_size
    assert torch.equal(x1, process.prior((B, L), torch.Generator().manual_seed(0), "cpu"))  # repeatable


def process_variants() -> list[tuple[str, dict]]:
    """Every registered process at its defaults, and once more with each setting it declares
    that changes the marginal (a hybrid's uniform share) set away from its default."""
    out = [(name, {}) for name in PROCESSES.names()]
    out += [(name, {"p_u": 0.2}) for name in PROCESSES.names() if "p_u" in _fields(PROCESSES.get(name))]
    return out


def make_process_with(name: str, changes: dict):
    process = make_process(name)
    if changes:
        process = type(process)(V, get_schedule("loglinear"), dataclasses.replace(process.settings, **changes))
        check_settings(process.settings)
    return process


@pytest.mark.parametrize("name,changes", process_variants())
def test_process_marginals_are_what_corrupt_draws(name, changes):
    """The histogram of ``corrupt`` at t is the process's own marginal q_t(· | x0) at every t
    (t = 0 the identity, t = 1 the prior), and ``prior`` draws ``prior_probs``."""
    process = make_process_with(name, changes)
    if process.vector_state:
        return vector_moments_are_what_corrupt_draws(process)
    n = 40000
    x0 = torch.full((n // 8, 8), 4)
    one_hot = torch.nn.functional.one_hot(torch.tensor(4), V).double()
    assert torch.allclose(prior_marginal(process), process.prior_probs(), atol=0.015)
    for t in (0.0, 0.3, 0.5, 0.7, 1.0):
        tt = torch.full((x0.shape[0],), t)
        xt = process.corrupt(x0, tt, torch.Generator().manual_seed(5))
        hist = torch.bincount(xt.flatten(), minlength=process.input_vocab_size).double() / xt.numel()
        expected = process.marginal(one_hot, torch.tensor(t, dtype=torch.float64))
        assert expected.shape == hist.shape and float(expected.sum()) == pytest.approx(1.0, abs=1e-12)
        assert float((hist - expected).abs().max()) < 0.015, (t, hist, expected)
    assert torch.allclose(process.marginal(one_hot, torch.tensor(1.0, dtype=torch.float64)), process.prior_probs(), atol=1e-9)


def vector_moments_are_what_corrupt_draws(process, n=20000):
    """A vector state's mean and spread are the process's own ``moments(x0, t)`` at every t, and
    at t = 1 within 0.1 of the prior's."""
    x0 = torch.full((n // 8, 8), 4)
    with torch.no_grad():
        prior = process.prior((n // 8, 8), torch.Generator().manual_seed(3), "cpu").flatten(0, 1)
        for t in (0.0, 0.3, 0.5, 0.7, 1.0):
            tt = torch.full((x0.shape[0],), t)
            xt = process.corrupt(x0, tt, torch.Generator().manual_seed(5)).flatten(0, 1)  # (n, C)
            mean, std = process.moments(x0[:1, :1], tt[:1])
            sd, tol = float(std[0]), 5 * float(std[0]) / n ** 0.5 + 1e-6
            torch.testing.assert_close(xt.mean(0), mean[0, 0], atol=tol, rtol=0)
            torch.testing.assert_close(xt.std(0), torch.full_like(xt[0], sd), atol=tol, rtol=0)
            if t == 1.0:
                assert float((xt.mean(0) - prior.mean(0)).abs().max()) < 0.1
                assert float((xt.std(0) - prior.std(0)).abs().max()) < 0.1


def clean_state(process, x0: torch.Tensor) -> torch.Tensor:
    """What a clean token is in the process's state: its id, or its embedding (a vector state)."""
    return process.embed(x0) if process.vector_state else x0


@pytest.mark.parametrize("name", PROCESSES.names())
def test_process_leaves_fixed_positions_and_draws_the_same_noise_elsewhere(name):
    process = make_process(name)
    b = batch()
    t = torch.full((B,), 0.6)
    with torch.no_grad():
        free = process.corrupt(b.x0, t, torch.Generator().manual_seed(7))
        held = process.corrupt(b.x0, t, torch.Generator().manual_seed(7), b.fixed)
        clean = clean_state(process, b.x0)
    assert torch.equal(held[b.fixed], clean[b.fixed])
    assert torch.equal(held[~b.fixed], free[~b.fixed])
    assert not torch.equal(free, clean)  # it does corrupt


@pytest.mark.parametrize("name", PROCESSES.names())
def test_process_times_and_predicted_positions(name):
    process = make_process(name)
    frac = torch.linspace(0, 0.999, 9)
    t = process.time(frac, 1e-3)
    assert bool(((t > 0) & (t <= 1)).all()) and bool((t[1:] >= t[:-1]).all())
    xt = process.corrupt(batch().x0, torch.full((B,), 0.5), torch.Generator().manual_seed(0))
    where = process.predicted(xt)
    assert where.shape == (B, L) and where.dtype == torch.bool


# ---- objectives ------------------------------------------------------------------------------

OBJECTIVE_ENTRIES = [(n, p) for n, p, _ in OBJECTIVES.entries()]
SAMPLER_ENTRIES = [(n, p) for n, p, _ in SAMPLERS.entries()]


@pytest.mark.parametrize("kind,entries", [("objective", OBJECTIVE_ENTRIES), ("sampler", SAMPLER_ENTRIES)])
def test_every_component_is_reachable_through_a_family(kind, entries):
    unreachable = [(n, p) for n, p in entries if family_for(p)[0] is None]
    assert not unreachable, f"{kind}s registered for a process no family offers: {unreachable}"


@pytest.mark.parametrize("family", FAMILIES.names())
def test_every_family_default_exists(family):
    cls = FAMILIES.get(family)
    assert cls.default_objective in cls.objectives and cls.default_sampler in cls.samplers
    for key in cls.process_choices.values():
        assert key in PROCESSES
        assert cls.default_objective in OBJECTIVES.names(key) and cls.default_sampler in SAMPLERS.names(key)


def loss(fam, model, b, seed=11, rows=slice(None)):
    return fam.loss(model, b, torch.Generator().manual_seed(seed), rows)


@pytest.mark.parametrize("name,process", OBJECTIVE_ENTRIES)
def test_objective_is_finite_repeatable_and_differentiable(name, process):
    fam, model = build(process, objective=name)
    b = batch()
    s = loss(fam, model, b)
    assert s.nats.shape == (B,) and s.count.shape == (B,)
    assert bool(torch.isfinite(s.nats).all()) and bool((s.count >= 0).all())
    assert bool((s.count <= b.target.sum(-1)).all())  # it counts target tokens at most
    torch.testing.assert_close(loss(fam, model, b).nats, s.nats, rtol=0, atol=0)
    s.mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("name,process", OBJECTIVE_ENTRIES)
def test_objective_is_additive_over_rows_and_blind_to_padding(name, process):
    """Rows 1..2 of the global batch scored alone give rows 1..2 of the whole (what each rank
    of a data-parallel step computes); a padded token's value changes nothing."""
    fam, model = build(process, objective=name)
    model.eval()
    b = batch()
    with torch.no_grad():
        whole = loss(fam, model, b)
        part = loss(fam, model, b, rows=slice(1, 3))
        x0 = b.x0.clone()
        x0[b.pad] = (x0[b.pad] + 1) % V
        repadded = loss(fam, model, Batch(x0, b.clean, b.pad))
    torch.testing.assert_close(part.nats, whole.nats[1:3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part.count, whole.count[1:3])
    torch.testing.assert_close(repadded.nats, whole.nats, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,process", [e for e in OBJECTIVE_ENTRIES if OBJECTIVES.get(*e).one_pass()])
def test_one_pass_objective_chunks_exactly(name, process):
    fam, model = build(process, objective=name)
    chunked, _ = build(process, objective=name, loss_chunk_rows=1)
    b = batch()
    plain = loss(fam, model, b)
    again = loss(chunked, model, b)
    torch.testing.assert_close(again.nats, plain.nats, rtol=1e-5, atol=1e-5)


# ---- samplers --------------------------------------------------------------------------------

@pytest.mark.parametrize("name,process", SAMPLER_ENTRIES)
def test_sampler_keeps_clean_positions_and_leaves_data_tokens(name, process):
    fam, model = build(process, sampler=name)
    model.eval()
    settings = dataclasses.replace(fam.sampler_settings, steps=6)
    check_settings(settings)
    given = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(2))
    clean = torch.zeros(3, 10, dtype=torch.bool)
    clean[:, :2] = True
    if not fam.causal:
        clean[0, -3:] = True  # the right side of a hole (diffusion families only)
    out, nfe = fam.sample(model, given, clean, torch.Generator().manual_seed(4), settings)
    assert out.shape == given.shape and out.dtype == torch.long
    assert int(out.min()) >= 0 and int(out.max()) < V, "a generated token outside the data vocabulary"
    assert torch.equal(out[clean], given[clean]), "a clean position changed"
    assert isinstance(nfe, int) and nfe >= 1
    again, _ = fam.sample(model, given, clean, torch.Generator().manual_seed(4), settings)
    assert torch.equal(again, out)


# ---- families --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES.names())
def test_family_likelihood_is_per_sequence_and_non_negative(family):
    cls = FAMILIES.get(family)
    process = next(iter(cls.process_choices.values()), "causal")
    fam, model = build(process)
    model.eval()
    with torch.no_grad():
        nll = fam.nll(model, batch(), torch.Generator().manual_seed(0), 2)
    assert nll.shape == (B,) and nll.dtype == torch.float64
    assert bool(torch.isfinite(nll).all()) and bool((nll >= 0).all())


def test_a_preset_family_is_a_family():
    """A family that is only a preset (a registered process, default components, the bound
    objective) needs no class: masked diffusion with time conditioning as a preset gives
    the very loss and bound of ``mdlm`` with ``time_conditioning=true``."""
    from dlm.families.diffusion import DiffusionFamily

    Preset = DiffusionFamily.preset("masked-timed", "masked-diffusion", "masked", default_objective="nelbo",
                                    default_time_conditioning=True)
    cfgs = [RunConfig(family=name, time_conditioning=tc, model=ModelConfig(size="tiny", n_layer=1, d_model=32,
                                                                          n_head=2, cond_dim=16))
            for name, tc in (("masked-timed", None), ("mdlm", True))]
    Preset.resolve(cfgs[0])
    FAMILIES.get("mdlm").resolve(cfgs[1])
    fams = [Preset(cfgs[0], V, 0), FAMILIES.get("mdlm")(cfgs[1], V, 0)]
    torch.manual_seed(0)
    model = fams[0].build_model()
    b = batch()
    losses = [f.loss(model, b, torch.Generator().manual_seed(3)).nats for f in fams]
    with torch.no_grad():
        bounds = [f.nll(model, b, torch.Generator().manual_seed(3), 2) for f in fams]
    assert fams[0].time_conditioned and type(fams[0].bound) is type(fams[1].bound)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    torch.testing.assert_close(bounds[0], bounds[1], rtol=0, atol=0)


@pytest.mark.parametrize("name,process", [e for e in SAMPLER_ENTRIES if e[1] != "causal"])
def test_diffusion_sampler_settings_extend_the_shared_ones(name, process):
    """steps, temperature, top-k, top-p and guidance exist for every diffusion sampler (the
    family reads ``guidance`` to wrap the model; the CLI's flags set the others)."""
    from dlm.samplers import DiffusionSamplerSettings

    cls = SAMPLERS.get(name, process)
    assert issubclass(cls.Settings, DiffusionSamplerSettings)
    check_settings(cls.Settings())


def test_a_learning_process_travels_with_the_model():
    """A process with parameters of its own becomes the model's submodule ``process``: its
    parameters are optimised, saved in the state dict and moved with the network; the
    parameter-free processes of today leave the model's keys as they were."""
    fam, model = build("masked")
    assert not any(k.startswith("process.") for k in model.state_dict())
    fam.process.register_parameter("log_scale", torch.nn.Parameter(torch.zeros(())))
    model = fam.build_model()
    assert "process.log_scale" in model.state_dict()
    assert any(p is fam.process.log_scale for p in model.parameters())


def test_vector_states_pass_through_the_shared_helpers():
    """keep_fixed, hide_clean, the Predictor and guidance accept (B, L, C) vectors — the state
    of a continuous (Gaussian) process — and call the backbone with ``embeds=``."""
    from dlm.batch import keep_fixed
    from dlm.objectives.base import Predictor
    from dlm.samplers.guidance import Guided, hide_clean

    fam, model = build("masked")
    model.eval()
    b = batch()
    e0 = model.embed(b.x0)  # (B, L, C)
    noisy = e0 + torch.randn(e0.shape, generator=torch.Generator().manual_seed(0))
    kept = keep_fixed(e0, noisy, b.fixed)
    assert torch.equal(kept[b.fixed], e0[b.fixed]) and torch.equal(kept[~b.fixed], noisy[~b.fixed])
    hidden = torch.zeros_like(noisy)
    assert torch.equal(hide_clean(noisy, b.clean, hidden)[b.clean], hidden[b.clean])
    where = b.target
    with torch.no_grad():
        by_ids = Predictor(model, b.x0, None, None, False)(where)
        by_vectors = Predictor(model, e0, None, None, False)(where)
        guided = Guided(model, fam.process, b.x0, b.clean, 1.0, torch.Generator().manual_seed(0))
        guided.hidden = torch.zeros_like(e0)  # a continuous process's prior draw: vectors
        torch.testing.assert_close(guided(e0, None, score_mask=where).shape, by_ids.shape)
    torch.testing.assert_close(by_vectors, by_ids)
