"""Gaussian embedding diffusion (``--family gaussian``, docs/gaussian.md): the forward marginal
against the schedule, the posterior against Bayes, the VLB of the exact posterior-mean
denoiser on a one-token source against its entropy (by quadrature), the bound of a trained
tiny model on a source of known entropy, samples, and the command line."""

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
from dlm.objectives.gaussian import diffusion_term, end_terms
from dlm.processes.gaussian import GaussianProcess
from dlm.schedules import get_schedule
from dlm.schema import ModelConfig, RunConfig
from dlm.settings import ComponentConfig, check_settings
from helpers import TINY, one_line_error, run


def gaussian(V=4, **settings) -> GaussianProcess:
    s = GaussianProcess.Settings(**settings)
    check_settings(s)
    torch.manual_seed(0)
    return GaussianProcess(V, get_schedule("loglinear"), s)


# ---- the process ------------------------------------------------------------------------------

def test_forward_marginal_mean_and_variance_follow_the_schedule():
    p = gaussian(V=5, embed_dim=8, gamma_min=-5.0, gamma_max=4.0)
    x0 = torch.full((4000, 8), 3)
    e = p.embed(torch.tensor(3))
    torch.testing.assert_close(e.norm(), torch.tensor(1.0))  # unit-norm embeddings
    for t in (0.0, 0.3, 0.7, 1.0):
        g = -5.0 + 9.0 * t
        alpha2, sigma2 = 1 / (1 + math.exp(g)), 1 / (1 + math.exp(-g))  # sigmoid(−γ), sigmoid(γ)
        assert alpha2 + sigma2 == pytest.approx(1.0)
        with torch.no_grad():
            z = p.corrupt(x0, torch.full((4000,), t), torch.Generator().manual_seed(1)).reshape(-1, 8)
        n = z.shape[0]  # 32,000 draws: 4.5 standard errors of the mean and of the variance
        torch.testing.assert_close(z.mean(0), math.sqrt(alpha2) * e.detach(), atol=4.5 * math.sqrt(sigma2 / n), rtol=0)
        torch.testing.assert_close(z.var(0), torch.full((8,), sigma2), atol=4.5 * sigma2 * math.sqrt(2 / n), rtol=0)
        assert float(p.snr(torch.tensor(t, dtype=torch.float64))) == pytest.approx(alpha2 / sigma2, rel=1e-9)


def test_clean_positions_keep_their_embedding_and_the_noise_elsewhere():
    p = gaussian(V=6)
    x0 = torch.randint(0, 6, (3, 9), generator=torch.Generator().manual_seed(0))
    fixed = torch.zeros(3, 9, dtype=torch.bool)
    fixed[:, :2] = True
    t = torch.tensor([0.2, 0.6, 1.0])
    with torch.no_grad():
        free = p.corrupt(x0, t, torch.Generator().manual_seed(2))
        held = p.corrupt(x0, t, torch.Generator().manual_seed(2), fixed)
        assert torch.equal(held[fixed], p.embed(x0)[fixed]) and torch.equal(held[~fixed], free[~fixed])


def test_posterior_is_bayes_on_the_gaussian_chain():
    """q(z_s | z_t, x) from the joint of (z_s, z_t) (z_t = α_{t|s} z_s + σ_{t|s} ε): the
    conditional of one Gaussian coordinate, written out."""
    p = gaussian(gamma_min=-4.0, gamma_max=5.0)
    for s, t in ((0.0, 0.4), (0.3, 0.9), (0.5, 1.0)):
        a_s, s_s = (float(v) for v in p.alpha_sigma(torch.tensor(s)))
        a_t, s_t = (float(v) for v in p.alpha_sigma(torch.tensor(t)))
        x, zt = 0.7, -0.4
        # joint of (z_s, z_t) given x: means (a_s x, a_t x), Cov = [[s_s², a_t/a_s s_s²], [·, s_t²]]
        cov_st = a_t / a_s * s_s ** 2
        mean = a_s * x + cov_st / s_t ** 2 * (zt - a_t * x)
        var = s_s ** 2 - cov_st ** 2 / s_t ** 2
        m, sd = p.posterior(torch.tensor([zt], dtype=torch.float64), torch.tensor([x], dtype=torch.float64),
                            torch.tensor(t), torch.tensor(s))
        assert float(m) == pytest.approx(mean, rel=1e-9, abs=1e-12) and float(sd) ** 2 == pytest.approx(var, abs=1e-12)


# ---- the bound of the exact denoiser ----------------------------------------------------------

def exact_bound_of_one_token(p: GaussianProcess, data: np.ndarray, nodes_t=200, nodes_z=32) -> float:
    """E_{x ~ data} of the VLB of one token under the exact posterior-mean denoiser (the
    network's logits log p(x | z_t) of the source), by quadrature: Gauss–Legendre in t,
    Gauss–Hermite in each of the embedding's (here 1 or 2) noise coordinates; the process's and
    objective's own functions evaluate every term."""
    V, C = p.vocab_size, p.embed_dim
    prior = torch.tensor(data, dtype=torch.float64)
    gh, wh = np.polynomial.hermite_e.hermegauss(nodes_z)  # ∫ f(ε) N(ε; 0, 1) dε ≈ Σ w f / √(2π)
    grids = np.meshgrid(*[gh] * C, indexing="ij")
    eps = torch.tensor(np.stack([g.ravel() for g in grids], -1), dtype=torch.float64)  # (Z, C)
    w_eps = torch.tensor(np.prod(np.meshgrid(*[wh / math.sqrt(2 * math.pi)] * C, indexing="ij"), 0).ravel())
    gl, wl = np.polynomial.legendre.leggauss(nodes_t)
    t = torch.tensor((gl + 1) / 2, dtype=torch.float64)  # (T,)
    a, s = (v[:, None, None] for v in p.alpha_sigma(t))  # (T, 1, 1)
    w = torch.tensor(wl / 2)[:, None] * w_eps[None]  # (T, Z)
    E = p.embeddings().double().detach()
    total = 0.0
    with torch.no_grad():
        for x in range(V):
            ends = float((w_eps * end_terms(torch.full((len(eps),), x), eps, p)).sum())
            z = a * E[x] + s * eps[None]  # (T, Z, C)
            d2 = (z[:, :, None, :] - a[..., None] * E).pow(2).sum(-1)  # (T, Z, V)
            logits = prior.log() - d2 / (2 * s ** 2)  # log p(x | z_t) up to a constant
            f = diffusion_term(logits.flatten(0, 1), torch.full((d2.shape[0] * d2.shape[1],), x),
                               t[:, None].expand(-1, len(eps)).flatten(), p)
            total += float(prior[x]) * (ends + float((w.flatten() * f).sum()))
    return total


@pytest.mark.parametrize("embed_dim", [1, 2])
def test_the_bound_of_the_exact_denoiser_is_the_entropy_up_to_its_end_points(embed_dim):
    """For a one-token source the VLB with the exact posterior mean is H plus what the end points
    leave (the prior's KL at t = 1, the uniform-prior decoder at t = 0): within 0.01 nats of H
    at γ ∈ [−8, 8] and never below it; a narrower range leaves more. (C = 1 holds two unit
    embeddings only: four tokens on them show what an embedding that merges tokens costs.)"""
    data = np.array([0.5, 0.25, 0.15, 0.1])
    H = float(-(data * np.log(data)).sum())
    p = gaussian(embed_dim=embed_dim, gamma_min=-8.0, gamma_max=8.0)
    with torch.no_grad():  # spread embeddings: a circle (C = 2) or the interval (C = 1, two per side)
        ang = torch.arange(4, dtype=torch.float32) * (math.pi / 2)
        p.embedding.copy_(torch.stack([ang.cos(), ang.sin()], -1) if embed_dim == 2 else
                          torch.tensor([[1.0], [-1.0], [1.0], [-1.0]]))
    if embed_dim == 1:  # two tokens share each embedding: the bound is the entropy of the pair the embedding
        pairs = np.array([0.65, 0.35])  # names, plus log 2 for the uniform decoder between the two
        want = float(-(pairs * np.log(pairs)).sum()) + math.log(2)
        assert exact_bound_of_one_token(p, data) == pytest.approx(want, abs=0.01)
        return
    bound = exact_bound_of_one_token(p, data)
    assert H <= bound < H + 0.01, (bound, H)
    narrow = gaussian(embed_dim=2, gamma_min=-2.0, gamma_max=2.0)
    with torch.no_grad():
        narrow.embedding.copy_(p.embedding)
    assert exact_bound_of_one_token(narrow, data) > bound + 0.02


# ---- through the family -----------------------------------------------------------------------

def family(objective=None, sampler=None, **process):
    cfg = RunConfig(family="gaussian", model=ModelConfig(size="tiny", n_layer=1, d_model=32, n_head=2, cond_dim=16))
    cfg.process = ComponentConfig("gaussian", process)
    cfg.objective = ComponentConfig(objective)
    cfg.sampler = ComponentConfig(sampler)
    cls = FAMILIES.get("gaussian")
    cls.resolve(cfg)
    fam = cls(cfg, 11, 0)
    torch.manual_seed(0)
    return fam, fam.build_model()


class ExactDenoiser(nn.Module):
    """logits = log p(x | z_t) for one-token rows of a known source: the optimal network."""

    def __init__(self, process: GaussianProcess, data: torch.Tensor):
        super().__init__()
        self.process, self.log_prior = process, data.log()

    def forward(self, x=None, t=None, score_mask=None, pad=None, embeds=None, **kw):
        z = (x if embeds is None else embeds).double()  # (B, L, C)
        a, s = self.process.alpha_sigma(t)
        E = self.process.embeddings().double()
        d2 = (z[:, :, None, :] - a[:, None, None, None] * E).pow(2).sum(-1)  # (B, L, V)
        logits = self.log_prior - d2 / (2 * s[:, None, None] ** 2)
        return logits[score_mask]


def test_the_family_bound_of_the_exact_denoiser_is_not_below_the_entropy():
    """The family's Monte Carlo VLB (its own nll) of the exact denoiser on one-token rows: its mean
    within 3 standard errors above H − 0 and within 0.05 of H."""
    fam, _ = family(embed_dim=4, gamma_min=-7.0, gamma_max=7.0)
    data = torch.tensor([0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.04, 0.03, 0.01, 0.01, 0.01], dtype=torch.float64)
    H = float(-(data * data.log()).sum())
    x0 = torch.multinomial(data, 6000, replacement=True, generator=torch.Generator().manual_seed(0))[:, None]
    with torch.no_grad():
        nll = fam.nll(ExactDenoiser(fam.process, data), Batch(x0), torch.Generator().manual_seed(1), 4)
    mean, se = float(nll.mean()), float(nll.std() / math.sqrt(len(nll)))
    assert mean > H - 3 * se and mean < H + 0.05 + 3 * se, (mean, se, H)


def test_samples_are_tokens_with_clean_positions_unchanged_and_repeat():
    fam, model = family()
    model.eval()
    given = torch.randint(0, 11, (3, 10), generator=torch.Generator().manual_seed(2))
    clean = torch.zeros(3, 10, dtype=torch.bool)
    clean[:, :2] = True
    clean[0, -3:] = True
    for guidance in (0.0, 1.5):
        settings = dataclasses.replace(fam.sampler_settings, steps=6, guidance=guidance)
        out, nfe = fam.sample(model, given, clean, torch.Generator().manual_seed(4), settings)
        assert out.dtype == torch.long and int(out.min()) >= 0 and int(out.max()) < 11
        assert torch.equal(out[clean], given[clean]) and nfe == 6
        again, _ = fam.sample(model, given, clean, torch.Generator().manual_seed(4), settings)
        assert torch.equal(again, out)


def test_the_exact_denoiser_samples_the_source():
    """The sampler with the exact denoiser of a one-token source draws that source's tokens."""
    fam, _ = family(embed_dim=4)
    data = torch.tensor([0.5, 0.3, 0.2] + [0.0] * 8, dtype=torch.float64).clamp_min(1e-30)
    given = torch.zeros(3000, 1, dtype=torch.long)
    out, _ = fam.sample(ExactDenoiser(fam.process, data), given, torch.zeros_like(given, dtype=torch.bool),
                        torch.Generator().manual_seed(0), dataclasses.replace(fam.sampler_settings, steps=20))
    hist = torch.bincount(out[:, 0], minlength=11).double() / 3000
    assert float((hist[:3] - data[:3]).abs().max()) < 0.04, hist


def test_the_embeddings_train_with_the_model_and_ce_is_an_objective():
    for objective in ("vlb", "ce"):
        fam, model = family(objective=objective)
        assert any(p is fam.process.embedding for p in model.parameters())
        nn.init.normal_(model.head.weight, std=0.02)  # (zero at init: the input would get no gradient yet)
        x0 = torch.randint(0, 11, (4, 12), generator=torch.Generator().manual_seed(0))
        fam.loss(model, Batch(x0), torch.Generator().manual_seed(1)).mean().backward()
        assert fam.process.embedding.grad is not None and float(fam.process.embedding.grad.abs().sum()) > 0


# ---- the command line -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    f = tmp_path_factory.mktemp("corpus") / "text.txt"
    f.write_text("".join(f"To be, or not to be, that is the question {i}.\n" for i in range(400)))
    return f


def test_train_eval_sample_through_the_cli(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(["train", "--family", "gaussian", "--data", str(corpus), "--out", str(out), "--steps", "4",
                        *TINY, "process.embed_dim=8"], capsys)
    assert code == 0, err
    code, text, err = run(["eval", str(out), "--json", "--max-tokens", "512", "--mc-samples", "2"], capsys)
    assert code == 0, err
    r = json.loads(text)
    assert r["bound"] and r["nll"] > 0 and math.isfinite(r["bits_per_byte"]) and "VLB" in r["bound_name"]
    code, text, err = run(["eval", str(out), "--max-tokens", "256", "--mc-samples", "1"], capsys)
    assert code == 0 and "VLB" in text and "bits/byte" in text and "NELBO" not in text, err
    code, text, err = run(["sample", str(out), "--prompt", "To be", "--num", "2", "--steps", "6", "--json"], capsys)
    assert code == 0, err
    assert all(s.startswith("To be") for s in json.loads(text)["samples"])
    code, text, err = run(["sample", str(out), "--infill", "To [MASK*5] be", "--num", "2", "--steps", "4", "--json",
                           "sampler.guidance=1"], capsys)
    assert code == 0, err
    assert all(s.startswith("To ") and s.endswith(" be") and len(s) == 11 for s in json.loads(text)["samples"])
    one_line_error(*run(["sample", str(out), "--sampler", "fast-dllm"], capsys)[::2], "fast-dllm")  # another process's


@pytest.mark.parametrize("setting,fragment", [("process.embed_dim=0", "process.embed_dim"),
                                              ("process.gamma_min=7", "wrong order"),
                                              ("process.gamma_max=-7", "wrong order"),
                                              ("process.gamma_min=nan", "process.gamma_min"),
                                              ("process.self_condition=1", "process.self_condition"),
                                              ("process.self_condition=-0.1", "process.self_condition"),
                                              ("sampler=fast-dllm", "fast-dllm"),
                                              ("eval.log_t_share=0.2", "log_t_share"),
                                              ("schedule=cosine", "gamma_min")])
def test_bad_input_is_one_line(setting, fragment, corpus, tmp_path, capsys):
    code, _, err = run(["train", "--family", "gaussian", "--data", str(corpus), "--out", str(tmp_path / "r"), *TINY,
                        setting], capsys)
    one_line_error(code, err, fragment)
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


# ---- a source of known entropy ----------------------------------------------------------------

@pytest.mark.slow
def test_the_bound_is_not_below_the_entropy_rate_of_a_markov_source(tmp_path, capsys):
    from test_known_entropy import K, chain_file, train_and_bound

    path, H = chain_file(tmp_path)
    r = train_and_bound(path, tmp_path / "gaussian", "gaussian", 150, 4, [], capsys)
    assert r["tokens"] >= 10_000
    assert r["nll"] > H - 3 * r["stderr"] - 0.01, (r["nll"], H, r["stderr"])
    assert r["nll"] < math.log(K) + 1.0, (r["nll"], H)  # it learned something (see docs/gaussian.md for the figures)


# ---- self-conditioning ------------------------------------------------------------------------

def test_self_conditioning_adds_a_zero_projection_and_trains_it():
    """process.self_condition > 0: a second input projection, zero at init (the first training
    steps are the plain network's), reached by the gradient; the bound's predictor is the two
    passes, a deterministic function of z_t (the same draws give the same bound); off: no
    projection and the network refuses an estimate."""
    fam, model = family(self_condition=0.5)
    assert model.sc_proj is not None and float(model.sc_proj.weight.detach().abs().sum()) == 0
    nn.init.normal_(model.head.weight, std=0.02)
    x0 = torch.randint(0, 11, (8, 12), generator=torch.Generator().manual_seed(0))
    fam.loss(model, Batch(x0), torch.Generator().manual_seed(1)).mean().backward()
    assert float(model.sc_proj.weight.grad.abs().sum()) > 0  # some rows read a first pass's estimate
    nn.init.normal_(model.sc_proj.weight, std=0.3)
    model.eval()
    with torch.no_grad():
        nll = fam.nll(model, Batch(x0), torch.Generator().manual_seed(2), 2)
        assert torch.equal(nll, fam.nll(model, Batch(x0), torch.Generator().manual_seed(2), 2))
        model.sc_proj.weight.zero_()  # the estimate ignored: a different predictor, a different bound
        assert not torch.allclose(nll, fam.nll(model, Batch(x0), torch.Generator().manual_seed(2), 2))
    _, plain = family()
    assert plain.sc_proj is None
    with pytest.raises(ValueError, match="self_cond"):
        plain(torch.zeros(1, 3, 16), None, self_cond=torch.zeros(1, 3, 16))


def test_self_conditioned_samples_keep_clean_positions_and_repeat():
    """The sampler feeds each step the previous estimate (with and without guidance): tokens of
    the vocabulary, clean positions as given, the same under the same seed, and the estimate
    is read (a nonzero projection changes the samples)."""
    fam, model = family(self_condition=0.5)
    nn.init.normal_(model.head.weight, std=0.5)
    model.eval()
    given = torch.randint(0, 11, (3, 10), generator=torch.Generator().manual_seed(2))
    clean = torch.zeros(3, 10, dtype=torch.bool)
    clean[:, :2] = True
    clean[1, 5:7] = True
    for guidance in (0.0, 1.5):
        settings = dataclasses.replace(fam.sampler_settings, steps=8, guidance=guidance)
        with torch.no_grad():
            model.sc_proj.weight.zero_()
            before, _ = fam.sample(model, given, clean, torch.Generator().manual_seed(4), settings)
            nn.init.normal_(model.sc_proj.weight, std=1.0, generator=torch.Generator().manual_seed(5))
            out, nfe = fam.sample(model, given, clean, torch.Generator().manual_seed(4), settings)
            again, _ = fam.sample(model, given, clean, torch.Generator().manual_seed(4), settings)
        assert out.dtype == torch.long and int(out.min()) >= 0 and int(out.max()) < 11 and nfe == 8
        assert torch.equal(out[clean], given[clean]) and torch.equal(again, out)
        assert not torch.equal(before, out), guidance


def test_self_conditioning_through_the_cli_and_an_old_run_folder(corpus, tmp_path, capsys):
    """Train / eval / sample (prompt, guided infill) a self-conditioned run; a run folder from
    before the setting (its config without process.self_condition) still evaluates and samples."""
    out = tmp_path / "sc"
    code, _, err = run(["train", "--family", "gaussian", "--data", str(corpus), "--out", str(out), "--steps", "4",
                        *TINY, "process.embed_dim=8", "process.self_condition=0.5"], capsys)
    assert code == 0, err
    code, text, err = run(["eval", str(out), "--json", "--max-tokens", "256", "--mc-samples", "1"], capsys)
    assert code == 0 and math.isfinite(json.loads(text)["nll"]), err
    code, text, err = run(["sample", str(out), "--infill", "To [MASK*5] be", "--num", "2", "--steps", "4", "--json",
                           "sampler.guidance=1"], capsys)
    assert code == 0, err
    assert all(s.startswith("To ") and s.endswith(" be") for s in json.loads(text)["samples"])
    import yaml

    old = tmp_path / "old"
    code, _, err = run(["train", "--family", "gaussian", "--data", str(corpus), "--out", str(old), "--steps", "2",
                        *TINY, "process.embed_dim=8"], capsys)
    assert code == 0, err
    config = yaml.safe_load((old / "config.yaml").read_text())
    del config["process"]["self_condition"]
    (old / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    code, text, err = run(["eval", str(old), "--json", "--max-tokens", "256", "--mc-samples", "1"], capsys)
    assert code == 0 and math.isfinite(json.loads(text)["nll"]), err
    code, text, err = run(["sample", str(old), "--prompt", "To be", "--num", "1", "--steps", "3", "--json"], capsys)
    assert code == 0 and json.loads(text)["samples"][0].startswith("To be"), err
