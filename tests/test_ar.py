import torch
import torch.nn.functional as F

from dlm.backbones import KVCache
from dlm.batch import Batch
from dlm.config import RunConfig
from dlm.families import FAMILIES
from dlm.samplers import SamplingOptions, filter_logits, sample_categorical

V = 13


def tiny_ar():
    fam = FAMILIES.get("ar")(RunConfig(family="ar"), V, eos_id=V - 1)
    torch.manual_seed(0)
    model = fam.build_model().eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return fam, model


def test_ar_loss_equals_cross_entropy(gen):
    fam, model = tiny_ar()
    x0 = torch.randint(0, V, (4, 10), generator=gen)
    inp = torch.cat([torch.full((4, 1), V - 1), x0[:, :-1]], dim=1)
    expected = F.cross_entropy(model(inp).reshape(-1, V), x0.reshape(-1))
    torch.testing.assert_close(fam.loss(model, Batch(x0), gen).mean(), expected)
    torch.testing.assert_close(fam.nll(model, Batch(x0), gen, 1).sum() / x0.numel(), expected.double())


def test_ar_scores_only_the_response_given_the_prompt(gen):
    """With a clean prompt the loss is the cross-entropy of the response tokens alone,
    each predicted from everything before it (the prompt included)."""
    fam, model = tiny_ar()
    x0 = torch.randint(0, V, (3, 10), generator=gen)
    clean = torch.zeros(3, 10, dtype=torch.bool)
    clean[:, :4] = True
    inp = torch.cat([torch.full((3, 1), V - 1), x0[:, :-1]], dim=1)
    ce = F.cross_entropy(model(inp).reshape(-1, V), x0.reshape(-1), reduction="none").view(3, 10)
    scored = fam.loss(model, Batch(x0, clean), gen)
    torch.testing.assert_close(scored.nats, ce[:, 4:].sum(-1))
    assert scored.count.tolist() == [6.0] * 3


def test_causal_model_does_not_see_the_future(gen):
    _, model = tiny_ar()
    x = torch.randint(0, V, (2, 12), generator=gen)
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % V
    torch.testing.assert_close(model(x)[:, :7], model(y)[:, :7])
    assert not torch.allclose(model(x)[:, 7:], model(y)[:, 7:])


def test_kv_cache_matches_full_forward(gen):
    _, model = tiny_ar()
    x = torch.randint(0, V, (2, 9), generator=gen)
    full = model(x)
    cache = KVCache(model.cfg.n_layer)
    steps = [model(x[:, :4], cache=cache)]
    for i in range(4, 9):
        steps.append(model(x[:, i : i + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_greedy_sampler_equals_argmax_decoding(gen):
    fam, model = tiny_ar()
    prompt = torch.tensor([3, 4])
    out, nfe = fam.generate(model, 2, 10, prompt, gen, SamplingOptions(temperature=0.0))
    seq = torch.tensor([[V - 1, 3, 4]] * 2)
    while seq.shape[1] < 11:
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq[:, 1:])
    assert nfe == 10 - 2


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k2 = filter_logits(logits, SamplingOptions(top_k=2))
    assert torch.isfinite(k2).sum() == 2 and torch.isfinite(k2[0, :2]).all()
    p = filter_logits(logits, SamplingOptions(top_p=0.7))  # 0.5 + 0.3 reaches 0.7
    assert torch.isfinite(p[0]).tolist() == [True, True, False, False]
    g = filter_logits(logits, SamplingOptions(temperature=0.0))
    assert torch.isfinite(g[0]).tolist() == [True, False, False, False]


def test_float64_gumbel_sampling_matches_probabilities():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05], dtype=torch.float64)
    logits = probs.log().expand(200_000, 4)
    draws = sample_categorical(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    torch.testing.assert_close(freq, probs, atol=0.004, rtol=0)
