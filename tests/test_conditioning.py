"""The clean/padding contract: given tokens are never corrupted, scored or changed,
padding is never attended to, every objective reports per-sequence nats and counts, and
the loss is normalised over the whole optimiser step (two ranks × b = one rank × 2b)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlm.batch import Batch
from dlm.config import ComponentConfig, RunConfig
from dlm.families import FAMILIES
from dlm.processes import MaskedProcess, UniformProcess
from dlm.samplers import SamplingOptions
from dlm.schedules import get_schedule

V = 17
ALL_OBJECTIVES = [("ar", "ce"), ("mdlm", "nelbo"), ("mdlm", "nelbo-count"), ("mdlm", "llada"), ("usdm", "nelbo"),
                  ("usdm", "naive"), ("usdm", "sddlm"), ("usdm", "sddlm-v1"), ("usdm", "sddlm-v2")]


def masks(gen, B=6, L=20):
    """A prompt of a different length per row, and padding at the end of some rows."""
    clean = torch.arange(L)[None] < torch.randint(1, 8, (B, 1), generator=gen)
    pad = torch.arange(L)[None] >= L - torch.randint(0, 5, (B, 1), generator=gen)
    return clean, pad & ~clean


def family(name, objective=None, **settings):
    cfg = RunConfig(family=name, objective=ComponentConfig(objective, settings))
    cfg.train.fused_head = False  # the plain head forms the logits these tests perturb (the fused one never forms any)
    fam = FAMILIES.get(name)(cfg, V, V - 1)
    torch.manual_seed(0)
    model = fam.build_model().eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return fam, model


@pytest.mark.parametrize("make", [
    lambda: MaskedProcess(V, get_schedule("cosine")),
    lambda: UniformProcess(V, get_schedule("loglinear")),
])
def test_no_process_corrupts_clean_or_padded_tokens(make, gen):
    p = make()
    x0 = torch.randint(0, V, (6, 20), generator=gen)
    clean, pad = masks(gen)
    fixed = clean | pad
    for t in (0.3, 0.9, 1.0):
        xt = p.corrupt(x0, torch.full((6,), t), gen, fixed)
        assert torch.equal(xt[fixed], x0[fixed])
        if t == 1.0 and isinstance(p, MaskedProcess):
            assert bool((xt[~fixed] == p.mask_id).all())  # everything else is corrupted
    if isinstance(p, MaskedProcess):
        free = (~fixed).sum(-1)
        xt = p.corrupt_count(x0, free, gen, fixed)  # k = every free position
        assert torch.equal(xt[fixed], x0[fixed]) and bool((xt[~fixed] == p.mask_id).all())
        xt = p.corrupt_count(x0, torch.ones(6, dtype=torch.long), gen, fixed)
        assert torch.equal((xt == p.mask_id).sum(-1), torch.ones(6, dtype=torch.long))
        assert torch.equal(xt[fixed], x0[fixed])


def test_corruption_draws_do_not_depend_on_the_masks():
    """The same generator state gives the same noise at the free positions with or without
    clean context (rows and ranks stay aligned whatever the masks)."""
    p = UniformProcess(V, get_schedule("loglinear"))
    x0 = torch.randint(0, V, (4, 30), generator=torch.Generator().manual_seed(0))
    clean = torch.zeros(4, 30, dtype=torch.bool)
    clean[:, :10] = True
    a = p.corrupt(x0, torch.full((4,), 0.5), torch.Generator().manual_seed(1))
    b = p.corrupt(x0, torch.full((4,), 0.5), torch.Generator().manual_seed(1), clean)
    assert torch.equal(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("causal", [False, True])
def test_padding_is_never_attended_to(causal, gen):
    name = "ar" if causal else "usdm"
    _, model = family(name)
    with torch.no_grad():  # every weight random: adaLN-zero gates would hide the attention
        for p in model.parameters():
            p.normal_(0, 0.2)
    x = torch.randint(0, V, (3, 16), generator=gen)
    pad = torch.zeros(3, 16, dtype=torch.bool)
    pad[0, 12:] = True  # right padding
    pad[1, 5] = True  # a padded token in the middle
    t = torch.full((3,), 0.5) if not causal else None
    y = x.clone()
    y[pad] = (y[pad] + 3) % V
    with torch.no_grad():
        a, b = model(x, t, pad=pad), model(y, t, pad=pad)
        torch.testing.assert_close(a[~pad], b[~pad], rtol=0, atol=0)
        # without the mask the padded tokens do change the other outputs
        assert not torch.allclose(model(x, t)[~pad], model(y, t)[~pad])


class Perturbed(torch.nn.Module):
    """The model, with its logits at ``where`` (B, L) replaced by noise before any objective
    sees them; the objective's positions are then taken from the full logits."""

    def __init__(self, model, where, seed):
        super().__init__()
        self.model, self.where, self.seed = model, where, seed

    def forward(self, x, t=None, score_mask=None, pad=None, cache=None):
        full = self.model(x, t, pad=pad).clone()
        if self.seed is not None:
            noise = torch.randn(full[self.where].shape, generator=torch.Generator().manual_seed(self.seed)) * 10
            full[self.where] = noise
        return full if score_mask is None else full[score_mask]


@pytest.mark.parametrize("name,objective", ALL_OBJECTIVES)
def test_logits_at_clean_or_padded_positions_never_change_a_loss(name, objective, gen):
    fam, model = family(name, objective)
    x0 = torch.randint(0, V - 1, (6, 20), generator=gen)
    clean, pad = masks(gen)
    batch = Batch(x0, clean, pad)
    plain = fam.loss(Perturbed(model, clean | pad, None), batch, torch.Generator().manual_seed(3))
    moved = fam.loss(Perturbed(model, clean | pad, 1), batch, torch.Generator().manual_seed(3))
    assert torch.equal(plain.nats, moved.nats) and torch.equal(plain.count, moved.count)
    assert bool((plain.count <= (~(clean | pad)).sum(-1)).all())
    # … while logits at target positions do move it
    target_moved = fam.loss(Perturbed(model, ~(clean | pad), 1), batch, torch.Generator().manual_seed(3))
    assert not torch.equal(plain.nats, target_moved.nats)


@pytest.mark.parametrize("name", ["ar", "mdlm", "usdm"])
def test_the_bound_scores_only_the_target(name, gen):
    """nll with a clean prompt changes with the target tokens, not with logits at the prompt,
    and a row whose target is empty costs nothing."""
    fam, model = family(name)
    x0 = torch.randint(0, V - 1, (4, 16), generator=gen)
    clean = torch.zeros(4, 16, dtype=torch.bool)
    clean[:, :6] = True
    clean[3] = True  # all context, no target
    with torch.no_grad():
        a = fam.nll(Perturbed(model, clean, None), Batch(x0, clean), torch.Generator().manual_seed(0), 2)
        b = fam.nll(Perturbed(model, clean, 5), Batch(x0, clean), torch.Generator().manual_seed(0), 2)
    assert torch.equal(a, b) and a[3] == 0 and bool((a[:3] > 0).all())


@pytest.mark.parametrize("name", ["mdlm", "usdm"])
def test_diffusion_samplers_keep_clean_tokens_anywhere(name, gen):
    fam, model = family(name)
    given = torch.randint(0, V - 1, (4, 24), generator=gen)
    clean = torch.rand(4, 24, generator=gen) < 0.4  # scattered, different per row
    for steps in (1, 7):
        x, _ = fam.sample(model, given, clean, gen, SamplingOptions(steps=steps))
        assert torch.equal(x[clean], given[clean])
        assert int(x.max()) < V and int(x.min()) >= 0  # no [MASK] left


def test_samplers_are_deterministic_under_a_seed(gen):
    for name in ("mdlm", "usdm", "ar"):
        fam, model = family(name)
        given = torch.randint(0, V - 1, (3, 16), generator=gen)
        clean = torch.zeros(3, 16, dtype=torch.bool)
        clean[:, :4] = True
        a, _ = fam.sample(model, given, clean, torch.Generator().manual_seed(9), SamplingOptions(steps=5))
        b, _ = fam.sample(model, given, clean, torch.Generator().manual_seed(9), SamplingOptions(steps=5))
        assert torch.equal(a, b)


def test_ar_sampler_takes_a_prompt_per_row_and_refuses_holes(gen):
    from dlm.errors import DlmError

    fam, model = family("ar")
    given = torch.randint(0, V - 1, (3, 12), generator=gen)
    clean = torch.arange(12)[None] < torch.tensor([[2], [5], [2]])
    x, nfe = fam.sample(model, given, clean, gen, SamplingOptions(temperature=0.0))
    assert torch.equal(x[clean], given[clean]) and nfe == 12 - 2
    # greedy: each row is the argmax continuation of its own prompt
    row = given[1:2, :5]
    seq = torch.cat([torch.full((1, 1), V - 1), row], dim=1)
    while seq.shape[1] < 13:
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(x[1], seq[0, 1:])
    hole = torch.zeros(3, 12, dtype=torch.bool)
    hole[:, 8:] = True
    with pytest.raises(DlmError, match="left context only"):
        fam.sample(model, given, hole, gen)


def test_two_ranks_take_the_same_step_as_one_with_twice_the_batch(tmp_path):
    """The loss is normalised by the scored tokens of the whole step: gradients of 2 gloo
    ranks × batch b (DDP) equal 1 rank × 2b, for every objective (real torchrun)."""
    script = Path(__file__).parent / "scripts" / "grad_step.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, double = tmp_path / "one.pt", tmp_path / "two.pt"
    r = subprocess.run([sys.executable, str(script), str(single)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                        str(double)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    one, two = torch.load(single), torch.load(double)
    assert set(one) == set(two) == {f"{f}/{o}" for f, o in ALL_OBJECTIVES}
    for key in one:
        assert one[key]["loss"] == pytest.approx(two[key]["loss"], rel=1e-5), key
        grads = [k for k in one[key] if k != "loss"]
        assert grads and set(grads) == {k for k in two[key] if k != "loss"}
        for k in grads:
            torch.testing.assert_close(one[key][k], two[key][k], rtol=1e-4, atol=1e-6, msg=f"{key} {k}")


def test_per_row_normalisation_would_differ(gen):
    """What the global count guards against: rows with few scored tokens. The mean over the
    step's tokens is not the mean of per-row means when rows score different numbers."""
    fam, model = family("ar")
    x0 = torch.randint(0, V - 1, (4, 16), generator=gen)
    clean = torch.arange(16)[None] < torch.tensor([[1], [14], [3], [15]])
    s = fam.loss(model, Batch(x0, clean), gen)
    assert s.count.tolist() == [15.0, 2.0, 13.0, 1.0]
    per_row = (s.nats / s.count).mean()
    assert not torch.isclose(s.mean(), per_row)


@pytest.mark.parametrize("name,objective", ALL_OBJECTIVES)
def test_the_chunked_output_layer_equals_the_plain_loss_in_value_and_gradient(name, objective, gen):
    """train.loss_chunk_rows: the output layer and loss a few sequences at a time (under
    activation checkpointing) give the plain loss and gradient, for every objective."""
    x0 = torch.randint(0, V - 1, (5, 20), generator=gen)
    clean, pad = masks(gen, B=5)
    results = []
    for rows in (0, 2):
        fam, model = family(name, objective)
        fam.cfg.train.loss_chunk_rows = rows
        model.train()
        scored = fam.loss(model, Batch(x0, clean, pad), torch.Generator().manual_seed(4))
        scored.mean().backward()
        results.append((scored, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (plain, g_plain), (chunked, g_chunked) = results
    torch.testing.assert_close(chunked.nats, plain.nats, rtol=1e-5, atol=1e-6)
    assert torch.equal(chunked.count, plain.count)
    assert set(g_plain) == set(g_chunked) and g_plain
    for k in g_plain:
        torch.testing.assert_close(g_chunked[k], g_plain[k], rtol=1e-4, atol=1e-6, msg=k)


def test_model_flops_per_token_and_mfu():
    """6·N (N without the embedding table) + 12·n_layer·d_model·L; MFU only with a known peak."""
    from dlm.flops import flops_per_token, mfu, peak_tflops

    _, model = family("ar")
    n = sum(p.numel() for p in model.parameters()) - model.embed.weight.numel()
    assert flops_per_token(model, 64) == 6 * n + 12 * model.cfg.n_layer * model.cfg.d_model * 64
    assert peak_tflops(torch.device("cpu")) is None and mfu(1e6, 1e9, None) is None
    assert peak_tflops(torch.device("cpu"), 100.0) == 100.0
    assert mfu(1e3, 1e9, 100.0) == pytest.approx(0.01)  # 1e12 FLOP/s of a 100 TFLOP/s peak


def test_training_logs_mfu_when_the_peak_is_given(tmp_path, capsys):
    from helpers import TINY, run

    corpus = tmp_path / "text.txt"
    corpus.write_text("".join(f"To be, or not to be, that is the question {i}.\n" for i in range(300)))
    out = tmp_path / "run"
    code, _, err = run(["train", "--data", str(corpus), "--out", str(out), "--steps", "2", *TINY,
                        "train.log_every=1", "train.peak_tflops=1"], capsys)
    assert code == 0, err
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["mfu"] < 1 for r in rows) and all("tokens_per_s" in r for r in rows)


@pytest.mark.parametrize("name", ["mdlm", "usdm", "ar"])
def test_activation_checkpointing_gives_the_same_gradients(name, gen):
    x0 = torch.randint(0, V - 1, (4, 16), generator=gen)
    grads = []
    for on in (False, True):
        fam, model = family(name)
        model.cfg.activation_checkpointing = on
        model.train()
        calls, forward = [], model.blocks[0].forward
        model.blocks[0].forward = lambda *a, **k: calls.append(1) or forward(*a, **k)  # (hooks are muted in a recompute)
        fam.loss(model, Batch(x0), torch.Generator().manual_seed(2)).mean().backward()
        assert len(calls) == (2 if on else 1)  # recomputed in the backward when on
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)
