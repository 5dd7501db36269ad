"""The output layer padded to a multiple of 64 rows (aligned matmuls on GPUs) is invisible:
logits, losses, gradients, samples and saved weights are those of the unpadded layer, and a
state dict of vocab_out rows (every run folder's, before and after the padding) loads."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from dlm.backbones import Transformer, TransformerConfig
from dlm.batch import Batch
from dlm.objectives.chunked import chunked_score
from dlm.trainer.checkpointer import pad_optimizer_state
from dlm.trainer.ema import EMA

sys.path.insert(0, str(Path(__file__).parent))
from synccount import SAMPLERS, V, draw, tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def padded_twin(model: Transformer) -> Transformer:
    twin = Transformer(dataclasses.replace(model.cfg, vocab_multiple=64))
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():  # padded rows that would win every argmax and hold all the mass if seen
        twin.head.weight[V:] = 0.0
        twin.head.bias[V:] = 50.0
    return twin


def test_rows_are_padded_on_large_vocabularies_only():
    cfg = TransformerConfig(vocab_in=50258, vocab_out=50257, n_layer=1, n_head=1, d_model=8)
    assert cfg.head_rows == 50304
    assert dataclasses.replace(cfg, vocab_out=4096).head_rows == 4096
    assert dataclasses.replace(cfg, vocab_out=37, vocab_multiple=64).head_rows == 64


@pytest.mark.parametrize("family", ["ar", "mdlm"])
def test_padded_rows_never_reach_a_logit_a_loss_or_a_gradient(family):
    fam, model = tiny(family)
    twin = padded_twin(model)
    assert twin.head.weight.shape[0] == 64
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    x = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(0))
    where = torch.rand(3, 16, generator=torch.Generator().manual_seed(1)) < 0.5
    t = torch.full((3,), 0.5)
    for kw in ({}, {"score_mask": where}, {"score_mask": where, "score_count": int(where.sum())}):
        a, b = model(x, t, **kw), twin(x, t, **kw)
        assert a.shape[-1] == V and torch.equal(a, b)
    x0 = torch.randint(0, V, (4, 32), generator=torch.Generator().manual_seed(2))
    for static in (False, True):
        fam.cfg.train.static_shapes = static
        for net in (model, twin):
            net.zero_grad()
            fam.loss(net, Batch(x0), torch.Generator().manual_seed(3)).nats.sum().backward()
        assert torch.allclose(model.head.weight.grad, twin.head.weight.grad[:V])
        assert not twin.head.weight.grad[V:].any() and not twin.head.bias.grad[V:].any()
    fam.cfg.train.static_shapes = None


def test_chunked_head_sees_the_unpadded_logits():
    fam, model = tiny("mdlm")
    twin = padded_twin(model)
    x0 = torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(2))
    c = fam.corrupt(fam.objective, Batch(x0), torch.full((4,), 0.5), torch.Generator().manual_seed(4), 1e-3)
    where = fam.objective.score_mask(c)
    out = [net(c.xt, score_mask=where, head_fn=lambda head, h: chunked_score(fam.objective, c, where, fam.process, 2,
                                                                             head, h)) for net in (model, twin)]
    assert torch.equal(out[0].nats, out[1].nats)


@pytest.mark.parametrize("key", ["ar", "mdlm-ancestral", "fast-dllm"])
def test_padded_rows_are_never_sampled(key):
    family, sampler, settings = SAMPLERS[key]
    fam, model = tiny(family, sampler, settings)
    twin = padded_twin(model).eval()
    prompt = torch.arange(4) % V
    outs = [fam.generate(net.eval(), 3, 24, prompt, torch.Generator().manual_seed(1))[0] for net in (model, twin)]
    assert torch.equal(outs[0], outs[1]) and int(outs[1].max()) < V
    assert torch.equal(outs[0], draw(key, 3)[0])


def test_an_unpadded_state_dict_loads_and_the_ema_and_optimizer_follow():
    """A run folder's weights (vocab_out rows, written before the padding existed or since)
    load into the padded layer; its EMA keeps vocab_out rows; AdamW moments of an older run
    are padded on resume."""
    cfg = TransformerConfig(vocab_in=8201, vocab_out=8200, n_layer=1, n_head=2, d_model=16)
    old = Transformer(dataclasses.replace(cfg, vocab_multiple=1))
    with torch.no_grad():
        old.head.weight.normal_()
    new = Transformer(cfg)
    assert new.head.weight.shape[0] == 8256
    new.load_state_dict(old.state_dict())
    x = torch.randint(0, 8200, (2, 8))
    assert torch.equal(old(x), new(x))
    ema = EMA(new, 0.9)
    assert ema.shadow["head.weight"].shape == (8200, 16)
    ema.update(new, 1)
    opt_old = torch.optim.AdamW(old.parameters())
    old(x).logsumexp(-1).sum().backward()
    opt_old.step()
    opt = torch.optim.AdamW(new.parameters())
    opt.load_state_dict(opt_old.state_dict())
    pad_optimizer_state(opt)
    new(x).logsumexp(-1).sum().backward()
    opt.step()
    assert opt.state[new.head.weight]["exp_avg"].shape == (8256, 16)
