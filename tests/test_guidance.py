"""Classifier-free guidance (unsupervised CFG, arXiv 2410.18514) for every diffusion sampler,
and the prompt dropout of training that teaches the unconditional distribution."""

import pytest
import torch

from dlm.backbones.transformer import BlockKV
from dlm.batch import Batch
from dlm.cli import main
from dlm.config import ComponentConfig, ModelConfig, RunConfig, TrainConfig
from dlm.errors import DlmError
from dlm.families import FAMILIES
from dlm.samplers.guidance import Guided, hide_clean
from helpers import TINY, one_line_error, run

V = 17
SAMPLERS = [("mdlm", "ancestral"), ("mdlm", "fast-dllm"), ("usdm", "ancestral")]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


def family(name, sampler="ancestral", objective=None, prompt_dropout=0.0, **settings):
    cfg = RunConfig(family=name, model=ModelConfig(n_layer=2, n_head=2, d_model=32),
                    objective=ComponentConfig(objective), sampler=ComponentConfig(sampler, settings),
                    train=TrainConfig(prompt_dropout=prompt_dropout))
    fam = FAMILIES.get(name)(cfg, V, V - 1)
    torch.manual_seed(0)
    model = fam.build_model().eval()
    with torch.no_grad():  # every weight random: adaLN-zero gates would hide the attention
        for p in model.parameters():
            p.normal_(0, 0.2)
    return fam, model


def prompted(gen, B=3, L=16):
    given = torch.randint(0, V - 1, (B, L), generator=gen)
    clean = torch.zeros(B, L, dtype=torch.bool)
    clean[:, :5] = True
    clean[1, 11:13] = True  # and a right context
    return given, clean


class Spy(torch.nn.Module):
    """The model, keeping every call's input."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x, t=None, score_mask=None, pad=None, **kw):
        self.inputs.append((x.clone(), kw.get("start", 0)))
        return self.model(x, t, score_mask=score_mask, pad=pad, **kw)


@pytest.mark.parametrize("name,sampler", SAMPLERS)
def test_zero_guidance_is_unguided_bit_for_bit(name, sampler, gen):
    fam, model = family(name, sampler, steps=12)
    given, clean = prompted(gen)
    settings = fam.sampler_settings
    assert settings.guidance == 0
    a, nfe_a = fam.sample(model, given, clean, torch.Generator().manual_seed(5))
    # the sampler called directly, with the bare model: what sampling was before guidance existed
    b, nfe_b = fam.sampler().sample(model, fam.process, given, clean, torch.Generator().manual_seed(5),
                                    fam.time_conditioned)
    assert torch.equal(a, b) and nfe_a == nfe_b
    fam.choose_sampler(ComponentConfig(sampler, {"guidance": 3.0, "steps": settings.steps}))
    c, _ = fam.sample(model, given, clean, torch.Generator().manual_seed(5))
    assert torch.equal(c[clean], given[clean]) and not torch.equal(a, c)  # guidance does change the samples


@pytest.mark.parametrize("name", ["mdlm", "usdm"])
def test_guided_logits_are_cond_plus_w_times_cond_minus_uncond(name, gen):
    fam, model = family(name)
    given, clean = prompted(gen)
    x = fam.process.prior(given.shape, gen, "cpu")
    x = torch.where(clean, given, x)
    t = torch.full((3,), 0.7) if fam.time_conditioned else None
    where = ~clean
    guided = Guided(model, fam.process, given, clean, 1.5, torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = guided(x, t, score_mask=where)
        cond = model(x, t, score_mask=where)
        hidden = fam.process.prior(given.shape, torch.Generator().manual_seed(2), "cpu")
        uncond = model(hide_clean(x, clean, hidden), t, score_mask=where)
        torch.testing.assert_close(out, cond + 1.5 * (cond - uncond), rtol=1e-5, atol=1e-5)
        if name == "mdlm":  # block-cache calls: the record holds both halves, a window hides its part
            kv = BlockKV()
            guided(x, t, score_mask=where, kv_out=kv)
            win = guided(x[:, 4:12], t, score_mask=where[:, 4:12], kv_in=kv, start=4)
            kc, ku = BlockKV(), BlockKV()
            model(x, t, kv_out=kc)
            model(hide_clean(x, clean, hidden), t, kv_out=ku)
            c = model(x[:, 4:12], t, score_mask=where[:, 4:12], kv_in=kc, start=4)
            u = model(hide_clean(x, clean, hidden)[:, 4:12], t, score_mask=where[:, 4:12], kv_in=ku, start=4)
            torch.testing.assert_close(win, c + 1.5 * (c - u), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,sampler", SAMPLERS + [("mdlm", "fast-dllm-dual")])
def test_the_unconditional_pass_sees_no_clean_token(name, sampler, gen):
    """Every call (full, block-cache window, or a subset of rows) runs cond rows then uncond
    rows; the uncond rows hold the hidden tokens at every clean position of their window.
    All rows share one prompt and right context, so a call on a subset of rows (a sampler's
    per-row cache) is checked the same way."""
    extra = {"cache": "dual"} if sampler == "fast-dllm-dual" else {}
    fam, model = family(name, sampler.replace("-dual", ""), guidance=2.0, steps=6, **extra)
    given, clean = prompted(gen)
    given, clean = given[:1].expand(3, -1).clone(), clean[:1].expand(3, -1).clone()
    clean[:, 11:13] = True
    spy = Spy(model)
    x, nfe = fam.sample(spy, given, clean, torch.Generator().manual_seed(1))
    assert torch.equal(x[clean], given[clean]) and int(x.max()) < V
    assert nfe > 0 and len(spy.inputs) > 0
    hidden = fam.process.prior(given.shape, torch.Generator().manual_seed(1), "cpu")  # the wrapper's first draw
    for inp, start in spy.inputs:
        cond, uncond = inp.chunk(2)  # one call on the doubled batch: cond rows, then uncond rows
        n, w = cond.shape
        window = clean[:n, start:start + w]
        assert torch.equal(cond[window], given[:n, start:start + w][window])
        assert torch.equal(cond[~window], uncond[~window])
        for row in uncond:  # the hidden tokens of one of the rows
            assert any(torch.equal(row[window[0]], h[start:start + w][window[0]]) for h in hidden)
        if name == "mdlm":
            assert bool((uncond[window] == fam.process.mask_id).all())


def test_guidance_without_given_tokens_is_an_error(gen):
    fam, model = family("mdlm", guidance=1.0)
    given = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(DlmError, match="guidance"):
        fam.sample(model, given, torch.zeros(2, 8, dtype=torch.bool), gen)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("guidance")
    corpus = d / "text.txt"
    corpus.write_text("".join(f"To be, or not to be, that is the question {i}.\n" for i in range(200)))
    out = d / "run"
    assert main(["train", "--family", "mdlm", "--data", str(corpus), "--out", str(out), "--steps", "2", *TINY,
                 "model.d_model=32", "model.n_head=2"]) == 0
    return out


def test_cli_guidance_without_a_prompt_is_a_one_line_error(trained, capsys):
    code, _, err = run(["sample", str(trained), "--num", "1", "--steps", "2", "sampler.guidance=2"], capsys)
    one_line_error(code, err, "guidance")
    code, out, err = run(["sample", str(trained), "--num", "1", "--steps", "2", "--prompt", "To be",
                          "sampler.guidance=2"], capsys)
    assert code == 0, err
    code, out, err = run(["sample", str(trained), "--num", "1", "--steps", "4", "--prompt", "To be",
                          "--sampler", "fast-dllm", "sampler.guidance=1", "sampler.cache=dual"], capsys)
    assert code == 0, err


def old_loss(fam, model, batch, generator, rows=slice(None)):
    """``DiffusionFamily.loss`` as it was before prompt dropout."""
    from dlm.families.diffusion import TRAIN_T_MIN
    from dlm.processes import low_discrepancy

    frac = low_discrepancy(batch.x0.shape[0], generator, batch.x0.device)
    c = fam.corrupt(fam.objective, batch, frac, generator, TRAIN_T_MIN)
    c = fam.objective.draw(c, generator, fam.process)
    return fam._score(fam.objective, model, c.rows(rows), batch.rows(rows).attention_pad)


LOSSES = [("mdlm", "nelbo"), ("mdlm", "nelbo-count"), ("usdm", "nelbo"), ("usdm", "sddlm-v1")]


@pytest.mark.parametrize("name,objective", LOSSES)
def test_zero_prompt_dropout_leaves_the_loss_bit_identical(name, objective, gen):
    fam, model = family(name, objective=objective)
    given, clean = prompted(gen, B=4)
    batch = Batch(given, clean)
    a = fam.loss(model, batch, torch.Generator().manual_seed(3))
    b = old_loss(fam, model, batch, torch.Generator().manual_seed(3))
    assert torch.equal(a.nats, b.nats) and torch.equal(a.count, b.count)


@pytest.mark.parametrize("name,objective", LOSSES)
def test_full_prompt_dropout_makes_the_loss_blind_to_the_prompt(name, objective, gen):
    fam, model = family(name, objective=objective, prompt_dropout=1.0)
    given, clean = prompted(gen, B=4)
    other = torch.where(clean, (given + 5) % (V - 1), given)  # other prompt tokens, same target
    with torch.no_grad():
        a = fam.loss(model, Batch(given, clean), torch.Generator().manual_seed(3))
        b = fam.loss(model, Batch(other, clean), torch.Generator().manual_seed(3))
        assert torch.equal(a.nats, b.nats) and torch.equal(a.count, b.count)
        plain, _ = family(name, objective=objective)
        c = plain.loss(model, Batch(given, clean), torch.Generator().manual_seed(3))
        d = plain.loss(model, Batch(other, clean), torch.Generator().manual_seed(3))
        assert not torch.equal(c.nats, d.nats)  # without dropout the prompt matters
        assert torch.equal(a.count, c.count)  # hidden prompts are still not scored


def test_prompt_dropout_is_drawn_over_the_global_batch(gen):
    """A rank's rows take the dropout decisions of the whole batch: rows 0, 2, … scored
    alone equal those rows of the whole batch scored at once."""
    fam, model = family("mdlm", prompt_dropout=0.5)
    given, clean = prompted(gen, B=6)
    with torch.no_grad():
        whole = fam.loss(model, Batch(given, clean), torch.Generator().manual_seed(7))
        mine = fam.loss(model, Batch(given, clean), torch.Generator().manual_seed(7), slice(0, None, 2))
    torch.testing.assert_close(mine.nats, whole.nats[0::2], rtol=1e-5, atol=1e-6)


def test_prompt_dropout_range_is_checked():
    from dlm.config import finalize

    with pytest.raises(DlmError, match="train.prompt_dropout"):
        finalize(RunConfig(family="mdlm", train=TrainConfig(prompt_dropout=1.5)))
