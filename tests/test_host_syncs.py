"""Host synchronisations per training micro-step and per sampler network call, counted on
the CPU by a dispatch mode over the operations that make a GPU's host wait
(``tests/synccount.py``), and the sync-free samplers against the tokens the samplers drew
before they were made so (``tests/data/host_sync_tokens.json``, written by
``tests/scripts/host_sync_fixture.py`` on commit 5783b0c's code).

Counted before the change on these tiny models: a training micro-step 4 (AR and MDLM: the
score mask's boolean gather and its backward, a ``nonzero``, the target's gather); masked
ancestral, 12 steps / 9 network calls, 62 (batch 1) and 73 (batch 3), then 13 (one a step)
before the windows drawn ahead; Fast-dLLM, 16 calls, 70, then 17; the AR sampler 1 per sample."""

import json
import sys
from pathlib import Path

import pytest
import torch

from dlm.backbones import KVCache
from dlm.batch import Batch
from dlm.distributed import Dist
from dlm.samplers.autoregressive import AutoregressiveSampler, GraphReadyDecoder
from dlm.samplers.fast_dllm import FastDllmSampler
from dlm.samplers.graphs import GraphedTrunk
from dlm.samplers.masked_ancestral import MaskedAncestralSampler
from dlm.processes.causal import Causal
from dlm.schema import TrainConfig
from dlm.trainer.step import accumulate_gradients

sys.path.insert(0, str(Path(__file__).parent))
from synccount import SAMPLERS, V, SyncCounter, draw, tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
FIXTURE = json.loads((Path(__file__).parent / "data" / "host_sync_tokens.json").read_text())


def micro_step(family: str, static: bool, clean: bool = False):
    """(syncs, loss) of one optimiser step of one micro-batch, packed text (or a prompt)."""
    fam, model = tiny(family, train=TrainConfig(static_shapes=static))
    x0 = torch.randint(0, V, (4, 32), generator=torch.Generator().manual_seed(0))
    batch = Batch(x0, clean=(torch.arange(32) < 5).expand(4, 32).clone() if clean else None)
    with SyncCounter() as c:
        loss = accumulate_gradients(fam, model, model, [batch], torch.Generator().manual_seed(3), Dist(),
                                    torch.device("cpu"))
    return c, loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["ar", "mdlm"])
def test_training_micro_step_makes_no_host_sync_with_static_shapes(family):
    c, _, _ = micro_step(family, True)
    assert c.total == 0, dict(c.counts)
    before, _, _ = micro_step(family, False)  # the gather of the scored positions: what a CPU runs
    assert before.total >= 3, dict(before.counts)


@pytest.mark.parametrize("family", ["ar", "mdlm"])
@pytest.mark.parametrize("clean", [False, True])
def test_static_shapes_give_the_gathered_loss_and_gradient(family, clean):
    _, loss_on, grads_on = micro_step(family, True, clean)
    _, loss_off, grads_off = micro_step(family, False, clean)
    assert torch.allclose(loss_on, loss_off, rtol=1e-6)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_on:
        assert torch.allclose(grads_on[name], grads_off[name], rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("key", sorted(SAMPLERS))
@pytest.mark.parametrize("num", [1, 3])
def test_samplers_draw_the_tokens_they_drew_before(key, num):
    tokens, _ = draw(key, num)
    assert tokens.tolist() == FIXTURE[f"{key}/{num}"]


@pytest.mark.parametrize("key", sorted(SAMPLERS))
def test_samplers_make_at_most_one_host_sync_a_network_call(key):
    """At most one a network call (each call the network gets, whatever its rows): the
    masked ancestral sampler reads a window of steps at once, so a step that unmasks nothing
    costs no read; Fast-dLLM reads its plan once and skips the read after a step that must
    end its block. Guidance checks once that there is a prompt to guide on (+1 a sample)."""
    family, sampler, settings = SAMPLERS[key]
    for num in (1, 3):
        invocations = []
        with SyncCounter() as c:
            draw(key, num, invocations=invocations)
        calls = len(invocations)
        budget = 2 if family == "ar" else calls + ("guidance" in settings)  # AR: the prompt check and lengths
        assert calls >= 5 and c.total <= budget, (key, num, calls, dict(c.counts))


def custom_draw(sampler: str, settings: dict, num: int = 3, length: int = 24, seed: int = 1):
    """(tokens, syncs, network calls) of an MDLM sampler with ``settings`` on the tiny model."""
    fam, model = tiny("mdlm", sampler, settings)
    model.eval()
    invocations = []
    model.register_forward_pre_hook(lambda module, args: invocations.append(1))
    with SyncCounter() as c:
        tokens, _ = fam.generate(model, num, length, torch.arange(4) % V, torch.Generator().manual_seed(seed))
    return tokens, c.total, len(invocations)


@pytest.mark.parametrize("steps", [64, 400])
def test_ancestral_steps_that_unmask_nothing_cost_no_read(steps):
    """More steps than positions: most steps unmask nothing. The windows drawn ahead read them
    all at once — at most one read a network call — and give the step-by-step tokens (those of
    ``cache: false``, which draws the same uniforms and Gumbel noise one step at a time)."""
    tokens, syncs, calls = custom_draw("ancestral", {"steps": steps})
    reference, ref_syncs, ref_calls = custom_draw("ancestral", {"steps": steps, "cache": False})
    assert calls <= 3 * 20 and syncs <= calls, (syncs, calls)
    assert ref_calls > calls and ref_syncs == ref_calls  # the reference calls at every step that has masks
    assert torch.equal(tokens, reference)


def test_fast_dllm_worst_case_is_one_read_more_than_its_calls():
    """Threshold 0: every block ends at its first step (each of its masks is above it), with
    rows of more than one mask, so every call is followed by a read: the plan read before
    the first call is the one more (the count of positions to decode, needed before the first
    Gumbel draw)."""
    for cache in ("none", "prefix", "dual"):
        _, syncs, calls = custom_draw("fast-dllm", {"steps": 16, "block_length": 8, "threshold": 0.0,
                                                     "cache": cache})
        assert calls == 3 and syncs == calls + 1, (cache, syncs, calls)


@pytest.mark.parametrize("static", [False, True])
def test_preallocated_kv_cache_decodes_as_the_growing_one(static):
    fam, model = tiny("ar")
    model.eval()
    x = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(5))
    outs = []
    for cache in (KVCache(2), KVCache(2, max_len=20, static=static)):
        with torch.no_grad():
            steps = [model(x[:, :6], cache=cache)]
            steps += [model(x[:, i:i + 1], cache=cache) for i in range(6, 20)]
        outs.append(torch.cat(steps, dim=1))
    if static:  # attention over the whole buffer: the same numbers up to float32 rounding
        assert torch.allclose(outs[0], outs[1], atol=1e-5)
        assert torch.equal(outs[0].argmax(-1), outs[1].argmax(-1))
    else:
        assert torch.equal(outs[0], outs[1])
    with torch.no_grad():
        full = model(x)
    assert torch.allclose(outs[1], full, atol=1e-5)


def test_static_kv_cache_keeps_its_shapes_and_refuses_overflow():
    _, model = tiny("ar")
    cache = KVCache(2, max_len=8, static=True)
    with torch.no_grad():
        model(torch.zeros(2, 7, dtype=torch.long), cache=cache)
        model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
        assert cache.k[0].shape[2] == 8
        with pytest.raises(ValueError, match="holds 8 positions"):
            model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="needs max_len"):
        KVCache(2, static=True)


def test_static_shapes_setting_through_the_cli(tmp_path, capsys):
    from helpers import TINY, one_line_error, run

    corpus = tmp_path / "text.txt"
    corpus.write_text("".join(f"To be, or not to be, that is the question {i}.\n" for i in range(200)))
    code, _, err = run(["train", "--data", str(corpus), "--out", str(tmp_path / "bad"), "--steps", "2", *TINY,
                        "train.static_shapes=maybe"], capsys)
    one_line_error(code, err, "train.static_shapes")
    assert not (tmp_path / "bad").exists()
    for family in ("ar", "mdlm"):
        code, _, err = run(["train", "--family", family, "--data", str(corpus), "--out", str(tmp_path / family),
                            "--steps", "2", *TINY, "train.static_shapes=true"], capsys)
        assert code == 0, err
        assert "static_shapes: true" in (tmp_path / family / "config.yaml").read_text()


class GraphReadySampler(AutoregressiveSampler):
    """The AR sampler with the decoder CUDA uses (the step a CUDA graph captures), run eagerly."""

    def decoder(self, model, num, length, device):
        return GraphReadyDecoder(model, num, length, device, graph=False)


@pytest.mark.parametrize("settings", [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 5}, {"temperature": 0.0}])
def test_graph_ready_decode_step_draws_the_cached_samplers_tokens(settings):
    """Positions on the device, a static cache, a fixed input buffer: the same tokens as the
    preallocated cache under a seed, rows with prompts of different lengths, no sync a token."""
    fam, model = tiny("ar")
    model.eval()
    given = torch.randint(0, V - 1, (4, 30), generator=torch.Generator().manual_seed(7))
    clean = torch.arange(30)[None] < torch.tensor([3, 3, 5, 0])[:, None]
    for seed in range(3):
        outs = []
        for cls in (AutoregressiveSampler, GraphReadySampler):
            sampler = cls(cls.Settings(**settings))
            with SyncCounter() as c:
                outs.append(sampler.sample(model, Causal(fam.eos_id), given, clean, torch.Generator().manual_seed(seed)))
            assert c.total <= 2, dict(c.counts)
        assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1] == outs[1][1] == 30  # the row without a prompt: 30 calls


def test_graph_ready_cache_keeps_its_position_on_the_device():
    _, model = tiny("ar")
    model.eval()
    x = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(5))
    cache = KVCache.graph_ready(2, 12, "cpu")
    with torch.no_grad():
        steps = [model(x[:, :4], cache=cache)] + [model(x[:, i:i + 1], cache=cache) for i in range(4, 12)]
        full = model(x)
    assert int(cache.position) == cache.length == 12
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    with pytest.raises(ValueError, match="must be static"):
        KVCache(2, max_len=4, position=torch.zeros((), dtype=torch.long))


class TrunkReadySampler(MaskedAncestralSampler):
    """``cache: false`` through the fixed-shape trunk CUDA would capture, run eagerly."""

    def trunk(self, model, x, t, pad):
        return GraphedTrunk(model, x, t, pad, graph=False)


@pytest.mark.parametrize("time_conditioned", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_graph_ready_trunk_step_draws_the_reference_tokens(time_conditioned, padded):
    """The no-cache ancestral step as the whole-batch trunk at fixed (B, L) from static
    buffers, the output layer after the read: the reference sampler's tokens under a seed."""
    fam, model = tiny("mdlm", "ancestral", {"steps": 16, "cache": False}, time_conditioning=time_conditioned)
    model.eval()
    given = torch.randint(0, V - 1, (3, 20), generator=torch.Generator().manual_seed(2))
    clean = torch.arange(20)[None] < torch.tensor([4, 0, 7])[:, None]
    pad = (torch.arange(20)[None] >= torch.tensor([20, 17, 20])[:, None]) if padded else None
    for seed in range(3):
        outs = []
        for cls in (MaskedAncestralSampler, TrunkReadySampler):
            sampler = cls(cls.Settings(steps=16, cache=False))
            with SyncCounter() as c:
                tokens, nfe = sampler.sample(model, fam.process, given, clean, torch.Generator().manual_seed(seed),
                                             time_conditioned, pad)
            assert c.total <= nfe, dict(c.counts)
            outs.append((tokens, nfe))
        assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1] == outs[1][1]


class TrunkReadyFastDllm(FastDllmSampler):
    """Fast-dLLM ``cache: none`` through the fixed-shape trunk CUDA would capture, run eagerly."""

    def trunk(self, model, x, t, pad):
        return GraphedTrunk(model, x, t, pad, graph=False)


@pytest.mark.parametrize("time_conditioned", [False, True])
def test_graph_ready_trunk_gives_fast_dllm_its_tokens(time_conditioned):
    fam, model = tiny("mdlm", time_conditioning=time_conditioned)
    model.eval()
    given = torch.randint(0, V - 1, (3, 20), generator=torch.Generator().manual_seed(2))
    clean = torch.arange(20)[None] < torch.tensor([4, 0, 7])[:, None]
    settings = {"steps": 12, "block_length": 8, "threshold": 0.3, "cache": "none"}
    for seed in range(3):
        outs = []
        for cls in (FastDllmSampler, TrunkReadyFastDllm):
            outs.append(cls(cls.Settings(**settings)).sample(model, fam.process, given, clean,
                                                              torch.Generator().manual_seed(seed), time_conditioned))
        assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1] == outs[1][1]
