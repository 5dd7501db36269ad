"""The fused output layer + weighted cross-entropy (dlm.objectives.fused, ``train.fused_head``):
the same loss and the same gradients as the plain head + loss, for every objective of the
registry (those that are not a weighted cross-entropy keep the plain path and are unchanged),
with and without static shapes; padded rows of the layer never scored."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dlm.objectives import OBJECTIVES
from dlm.objectives.fused import FusedLinearCrossEntropy, chunk_rows, fused_ce, linear_layer

sys.path.insert(0, str(Path(__file__).parent))
from helpers import TINY, one_line_error, run  # noqa: E402
from test_contracts import batch, build, loss  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ONE_PASS = [(n, p) for n, p, _ in OBJECTIVES.entries() if OBJECTIVES.get(n, p).one_pass()]
# the objectives that are a weighted cross-entropy over their scored positions (token_weights)
WEIGHTED = {("ce", "causal"), ("nelbo", "masked"), ("llada", "masked"), ("nelbo-count", "masked"),
            ("naive", "uniform"), ("sddlm", "uniform"), ("ce", "gaussian")}


def plain(h, weight, bias, target, weights, vocab):
    logits = (h @ weight.t() + bias)[:, :vocab]
    return F.cross_entropy(logits, target, reduction="none") * weights


def case(n=23, c=8, rows=40, vocab=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(rows, c, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(rows, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, vocab, (n,), generator=g)
    weights = torch.rand(n, generator=g, dtype=torch.float64) * (torch.rand(n, generator=g) < 0.7)
    return h, weight, bias, target, weights.requires_grad_()


@pytest.mark.parametrize("chunk", [1, 5, 23, 64])
def test_function_equals_the_plain_head_in_value_and_gradient(chunk):
    h, weight, bias, target, weights = case()
    inputs = (h, weight, bias, weights)
    got = FusedLinearCrossEntropy.apply(h, weight, bias, target, weights, 37, chunk)
    want = plain(h, weight, bias, target, weights, 37)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got.sum() * 3.0, inputs), torch.autograd.grad(want.sum() * 3.0, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_padded_rows_are_never_scored():
    h, weight, bias, target, weights = case()
    with torch.no_grad():  # rows 37.. of a padded layer: they would hold all the mass if scored
        bias[37:] = 80.0
    got = FusedLinearCrossEntropy.apply(h, weight, bias, target, weights, 37, 4)
    torch.testing.assert_close(got.double(), plain(h, weight, bias, target, weights, 37), rtol=1e-6, atol=1e-6)
    dw, db = torch.autograd.grad(got.sum(), (weight, bias))
    assert not dw[37:].any() and not db[37:].any() and dw[:37].abs().sum() > 0


def test_a_gradient_that_differs_between_scored_positions_is_refused():
    h, weight, bias, target, weights = case()
    out = FusedLinearCrossEntropy.apply(h, weight, bias, target, weights, 37, 4)
    with pytest.raises(RuntimeError, match="differs between scored positions"):
        (out * torch.arange(23.0, dtype=torch.float64)).sum().backward()


def test_bf16_autocast_runs_the_head_in_bf16_and_the_loss_in_float32():
    h, weight, bias, target, weights = (v.detach().float() if v.is_floating_point() else v for v in case())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = FusedLinearCrossEntropy.apply(h, weight, bias, target, weights, 37, 8)
        ref = F.cross_entropy(F.linear(h, weight, bias)[:, :37].float(), target, reduction="none") * weights
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)


def test_chunks_hold_about_as_many_logits_as_the_hidden_states_values():
    assert chunk_rows(16384, 50304, 768) == 256
    assert chunk_rows(10, 50304, 768) == 1 and chunk_rows(4096, 64, 128) == 4096


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("name,process", ONE_PASS)
def test_every_objective_scores_alike_fused_or_plain(name, process, static):
    fused, model = build(process, objective=name, fused_head=True, static_shapes=static)
    unfused, twin = build(process, objective=name, fused_head=False, static_shapes=static)
    twin.load_state_dict(model.state_dict())  # (a process with parameters is the model's submodule)
    b = batch()
    grads = []
    for fam, net in ((fused, model), (unfused, twin)):
        s = loss(fam, net, b)
        s.nats.sum().backward()
        grads.append((s.nats.detach(), s.count, [p.grad for p in net.parameters() if p.grad is not None]))
    (n1, k1, g1), (n2, k2, g2) = grads
    torch.testing.assert_close(n1, n2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k1, k2)
    assert len(g1) == len(g2) and g1
    for a, b_ in zip(g1, g2):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-6)
    if hasattr(fused, "corrupt"):  # which objectives take the fused path: the weighted cross-entropies
        c = fused.corrupt(fused.objective, b, torch.full((b.x0.shape[0],), 0.5), torch.Generator().manual_seed(0), 1e-3)
        where = fused.objective.score_mask(c)
        assert (fused.objective.token_weights(c, where, fused.process) is not None) == ((name, process) in WEIGHTED)


def test_the_transformer_head_is_found_padded_or_not():
    _, model = build("masked")
    assert linear_layer(model.head) == (model.head, model.vocab_out)
    assert linear_layer(model.logits_of) == (model.head, model.vocab_out)
    assert linear_layer(lambda z: z) is None
    h = torch.randn(2, 5, model.head.in_features)
    target = torch.randint(0, model.vocab_out, (2, 5))
    out = fused_ce(model.head, model.vocab_out, h, target, torch.ones(2, 5))
    torch.testing.assert_close(out, F.cross_entropy(model.head(h).flatten(0, 1), target.flatten(),
                                                    reduction="none").view(2, 5), rtol=1e-5, atol=1e-5)


def test_bad_fused_head_value_is_one_line(tmp_path, capsys):
    code, _, err = run(["train", *TINY, "--steps", "1", "--out", str(tmp_path / "r"), "train.fused_head=maybe"], capsys)
    one_line_error(code, err, "fused_head")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_the_compiled_chunk_gradient_equals_the_eager_one():
    from dlm.objectives.fused import compiled_logit_gradient, logit_gradient

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 64, generator=g)
    target = torch.randint(0, 50, (16,), generator=g)
    scale = torch.rand(16, generator=g)
    want = logit_gradient(logits.clone(), target, scale, 50)
    got = compiled_logit_gradient()(logits.clone(), target, scale, 50)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not got[1][:, 50:].any()
