"""The GPU-minded paths on the CPU: every weighted cross-entropy objective scored with static
shapes (whole batch or chunked) equals the gathered score in value and gradient; RoPE in the
compute dtype is the float32 rotation exactly in float32; the foreach EMA equals the loop."""

import sys
from pathlib import Path

import pytest
import torch

from dlm.backbones.transformer import apply_rotary
from dlm.batch import Batch
from dlm.objectives import OBJECTIVES
from dlm.schema import TrainConfig
from dlm.trainer.ema import EMA

sys.path.insert(0, str(Path(__file__).parent))
from synccount import V, tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
WEIGHTED = [("ar", "ce"), ("mdlm", "nelbo"), ("mdlm", "llada"), ("mdlm", "nelbo-count")]


def test_every_weighted_objective_is_listed():
    from dlm.objectives.base import Objective
    weighted = {(process, name) for name, process, cls in OBJECTIVES.entries()
                if cls.token_weights is not Objective.token_weights}
    assert weighted == {("causal", "ce"), ("masked", "nelbo"), ("masked", "llada"), ("masked", "nelbo-count"),
                        ("uniform", "naive"), ("gaussian", "ce"),
                        ("uniform", "sddlm"), ("uniform", "sddlm-v1"), ("uniform", "sddlm-v2")}  # v1/v2: None


def scored(family, objective, static, rows, clean):
    from dlm.config import ComponentConfig

    fam, model = tiny(family, objective=ComponentConfig(objective, {}),
                      train=TrainConfig(static_shapes=static, loss_chunk_rows=rows))
    x0 = torch.randint(0, V, (4, 24), generator=torch.Generator().manual_seed(0))
    batch = Batch(x0, clean=(torch.arange(24) < 6).expand(4, 24).clone() if clean else None)
    s = fam.loss(model, batch, torch.Generator().manual_seed(3))
    (s.nats.sum() / s.count.sum()).backward()
    return s, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,objective", WEIGHTED)
@pytest.mark.parametrize("rows", [0, 3])
def test_static_scoring_equals_the_gathered_one(family, objective, rows):
    for clean in (False, True):
        ref, ref_grads = scored(family, objective, False, 0, clean)
        got, grads = scored(family, objective, True, rows, clean)
        assert torch.equal(ref.count, got.count)
        torch.testing.assert_close(got.nats, ref.nats, rtol=1e-5, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-7)


def test_rope_in_float32_is_the_float32_rotation_and_bf16_stays_close():
    x = torch.randn(2, 3, 10, 8, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(10.0)[:, None] * (1.0 / 10000 ** (torch.arange(0, 8, 2) / 8))[None]
    cos, sin = pos.cos(), pos.sin()
    x1, x2 = x.chunk(2, dim=-1)
    assert torch.equal(apply_rotary(x, cos, sin), torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1))
    low = apply_rotary(x.bfloat16(), cos, sin)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), apply_rotary(x, cos, sin), rtol=2e-2, atol=2e-2)


def test_foreach_ema_equals_the_loop_and_follows_a_restored_shadow():
    _, model = tiny("mdlm")
    ema = EMA(model, 0.9)
    ref = {k: v.clone() for k, v in ema.shadow.items()}
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (step + 1))
        ema.update(model, step)
        d = min(0.9, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            ref[k].mul_(d).add_(v.float(), alpha=1 - d)
    assert all(torch.equal(ema.shadow[k], ref[k]) for k in ref)
    ema.shadow = {k: torch.zeros_like(v) for k, v in ref.items()}  # a resume replaces the shadow
    ema.update(model, 100)
    assert all(torch.allclose(ema.shadow[k], (1 - 0.9) * v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_compiled_head_and_loss_equal_the_eager_ones():
    """train.compile with static shapes compiles the head's loss: the fused head's per-chunk
    softmax and gradient (what CUDA runs by default; with train.fused_head=false the plain
    head and its loss as one compiled function)."""
    ref, ref_grads = scored("mdlm", "nelbo", True, 0, False)
    from dlm.config import ComponentConfig

    fam, model = tiny("mdlm", objective=ComponentConfig("nelbo", {}), train=TrainConfig(static_shapes=True, compile=True))
    x0 = torch.randint(0, V, (4, 24), generator=torch.Generator().manual_seed(0))
    s = fam.loss(model, Batch(x0), torch.Generator().manual_seed(3))
    (s.nats.sum() / s.count.sum()).backward()
    torch.testing.assert_close(s.nats, ref.nats, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6)
