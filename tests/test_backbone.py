"""The backbone contract (``dlm.backbones.base.Backbone``), held against the transformer: ids
or vectors in (the same network either way), exactly one of the two, ``score_mask`` / ``pad``
/ ``head_fn`` as documented, time conditioning required when built with it, and the
``BACKBONES`` registry building what a family built directly before (same state_dict)."""

import pytest
import torch

from dlm.backbones import BACKBONES, Backbone, KVCache, Transformer, TransformerConfig, build_backbone, resolve_size
from dlm.config import ModelConfig
from dlm.errors import DlmError

V_IN, V_OUT, B, L = 23, 22, 3, 9
SHAPES = {"bidirectional": dict(), "dit-time-conditioned": dict(cond_dim=16), "causal": dict(causal=True)}


def _model(gen, **shape) -> Transformer:
    """A tiny transformer with every weight drawn (the head and adaLN start at zero)."""
    model = Transformer(TransformerConfig(vocab_in=V_IN, vocab_out=V_OUT, n_layer=2, n_head=2, d_model=16, **shape))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2, generator=gen)
    return model


def _inputs(gen, model):
    x = torch.randint(0, V_IN, (B, L), generator=gen)
    t = torch.rand(B, generator=gen) if model.time_conditioned else None
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[0, 6:] = True
    return x, t, pad


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_embeds_of_the_ids_give_the_ids_logits_and_gradients(shape, gen):
    model = _model(gen, **shape)
    x, t, pad = _inputs(gen, model)
    where = torch.rand(B, L, generator=gen) < 0.5
    out = {}
    for name, call in (("ids", lambda: model(x, t, score_mask=where, pad=pad)),
                       ("embeds", lambda: model(embeds=model.embed(x), t=t, score_mask=where, pad=pad))):
        model.zero_grad()
        logits = call()
        (logits.log_softmax(-1)[:, 0].sum() + logits.square().mean()).backward()
        out[name] = logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(out["embeds"][0], out["ids"][0], rtol=0, atol=0)
    assert out["ids"][1].keys() == out["embeds"][1].keys()
    for n, g in out["ids"][1].items():
        torch.testing.assert_close(out["embeds"][1][n], g, rtol=0, atol=0, msg=n)
    assert out["ids"][1]["embed.weight"].abs().sum() > 0  # the input embedding learns through either path


def test_gradients_reach_the_input_vectors(gen):
    model = _model(gen, cond_dim=16)
    x, t, _ = _inputs(gen, model)
    embeds = model.embed(x).detach().requires_grad_()
    model(embeds=embeds, t=t).sum().backward()
    assert embeds.grad.shape == (B, L, 16) and embeds.grad.abs().sum() > 0


def test_a_kv_cache_decodes_from_vectors_as_from_ids(gen):
    model = _model(gen, causal=True).eval()
    x, _, _ = _inputs(gen, model)
    full = model(x)  # (B, L, V)
    cache = KVCache(model.cfg.n_layer)
    steps = [model(embeds=model.embed(x[:, :5]), cache=cache)]
    steps += [model(embeds=model.embed(x[:, i:i + 1]), cache=cache) for i in range(5, L)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda m, x: m(x, embeds=m.embed(x)), "got both"),
    (lambda m, x: m(), "got neither"),
    (lambda m, x: m(t=None, score_mask=None), "got neither"),
    (lambda m, x: m(embeds=m.embed(x)[..., :8]), r"embeds must be \(B, L, 16\)"),
    (lambda m, x: m(embeds=m.embed(x)[0]), r"embeds must be \(B, L, 16\)"),
    (lambda m, x: m(m.embed(x)), "x must be .* token ids"),
], ids=["both", "neither", "neither-with-keywords", "wrong-width", "two-dims", "vectors-as-x"])
def test_exactly_one_of_ids_and_vectors(call, message, gen):
    model = _model(gen)
    x, _, _ = _inputs(gen, model)
    with pytest.raises(ValueError, match=message):
        call(model, x)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_score_mask_pad_and_head_fn(shape, gen):
    model = _model(gen, **shape)
    x, t, pad = _inputs(gen, model)
    where = torch.rand(B, L, generator=gen) < 0.5
    full = model(x, t, pad=pad)  # (B, L, V)
    assert full.shape == (B, L, V_OUT) and full.dtype == torch.float32
    # score_mask: the same logits, at its positions only, row-major
    torch.testing.assert_close(model(x, t, score_mask=where, pad=pad), full[where], rtol=1e-6, atol=1e-6)
    # pad: a padded token changes no other position's output
    x2 = x.clone()
    x2[0, 6:] = (x2[0, 6:] + 1) % V_IN
    torch.testing.assert_close(model(x2, t, pad=pad)[~pad], full[~pad], rtol=1e-6, atol=1e-6)
    # … while without pad it does (the bidirectional models: later keys are seen)
    if not model.causal:
        assert not torch.allclose(model(x2, t)[0, :6], model(x, t)[0, :6])
    # head_fn: the output layer and the (N, C) hidden states, its result returned as is
    seen = {}

    def head_fn(head, h):
        seen["head"], seen["h"] = head, h
        return head(h).float(), "extra"

    logits, extra = model(x, t, score_mask=where, pad=pad, head_fn=head_fn)
    assert seen["head"] is model.head and seen["h"].shape == (int(where.sum()), model.d_model) and extra == "extra"
    torch.testing.assert_close(logits, full[where], rtol=1e-6, atol=1e-6)


def test_time_conditioning_needs_t_and_plain_models_ignore_it(gen):
    dit = _model(gen, cond_dim=16)
    x, t, _ = _inputs(gen, dit)
    with pytest.raises(ValueError, match="time-conditioned: pass t"):
        dit(x)
    with pytest.raises(ValueError, match="time-conditioned: pass t"):
        dit(embeds=dit.embed(x))
    plain = _model(gen)
    torch.testing.assert_close(plain(x, t), plain(x), rtol=0, atol=0)


def test_the_contract_attributes(gen):
    for shape in SHAPES.values():
        model = _model(gen, **shape)
        assert isinstance(model, Backbone)
        assert (model.d_model, model.vocab_in, model.vocab_out) == (16, V_IN, V_OUT)
        assert model.causal == bool(shape.get("causal"))
        assert model.time_conditioned == bool(shape.get("cond_dim"))
        x, _, _ = _inputs(gen, model)
        assert model.embed(x).shape == (B, L, model.d_model)


def _direct(cfg: ModelConfig, vocab_in, vocab_out, causal, cond_dim) -> Transformer:
    """What ``Family.build_model`` constructed before the registry."""
    size = resolve_size(cfg)
    return Transformer(TransformerConfig(vocab_in=vocab_in, vocab_out=vocab_out, n_layer=size.n_layer,
                                         n_head=size.n_head, d_model=size.d_model, causal=causal, cond_dim=cond_dim,
                                         mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout,
                                         activation_checkpointing=cfg.activation_checkpointing))


@pytest.mark.parametrize("cfg, causal, cond_dim", [
    (ModelConfig(), False, 0),
    (ModelConfig(), False, 128),
    (ModelConfig(), True, 0),
    (ModelConfig(size="mini", n_layer=3, mlp_ratio=2, dropout=0.1, activation_checkpointing=True), False, 32),
], ids=["tiny", "tiny-time-conditioned", "tiny-causal", "overridden"])
def test_the_registry_builds_what_the_direct_construction_built(cfg, causal, cond_dim):
    assert "transformer" in BACKBONES.names()
    torch.manual_seed(0)
    old = _direct(cfg, 50, 49, causal, cond_dim)
    torch.manual_seed(0)
    new = build_backbone("transformer", cfg, vocab_in=50, vocab_out=49, causal=causal, cond_dim=cond_dim)
    assert type(new) is Transformer and new.cfg == old.cfg
    old_sd, new_sd = old.state_dict(), new.state_dict()
    assert list(new_sd) == list(old_sd)
    for k in old_sd:
        assert new_sd[k].shape == old_sd[k].shape, k
        torch.testing.assert_close(new_sd[k], old_sd[k], rtol=0, atol=0, msg=k)
    new.load_state_dict(old_sd)  # strict: an old checkpoint loads


def test_the_state_dict_keeps_its_names():
    """Checkpoints written before the backbone contract must load: these are their keys."""
    model = Transformer(TransformerConfig(vocab_in=5, vocab_out=4, n_layer=1, n_head=2, d_model=8, cond_dim=4))
    block = ["norm1.weight", "attn.qkv.weight", "attn.proj.weight", "norm2.weight", "mlp.fc.weight", "mlp.fc.bias",
             "mlp.proj.weight", "mlp.proj.bias", "ada.weight", "ada.bias"]
    assert list(model.state_dict()) == [
        "embed.weight", "time.mlp.0.weight", "time.mlp.0.bias", "time.mlp.2.weight", "time.mlp.2.bias",
        *(f"blocks.0.{k}" for k in block), "norm.weight", "final_ada.weight", "final_ada.bias",
        "head.weight", "head.bias"]


def test_unknown_backbones_and_sizes_are_refused():
    with pytest.raises(DlmError, match="unknown backbone 'nope'.*transformer"):
        build_backbone("nope", ModelConfig(), vocab_in=5, vocab_out=4, causal=False, cond_dim=0)
    with pytest.raises(DlmError, match="unknown model size 'huge'"):
        build_backbone("transformer", ModelConfig(size="huge"), vocab_in=5, vocab_out=4, causal=False, cond_dim=0)
