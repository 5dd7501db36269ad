"""Data read ahead by a thread (PrefetchLoader): the batches of the loader bit for bit, a state
that is the consumer's (exact resume), FSDP2's mixed-precision policy, DDP without buffer
broadcasts (no dlm model has a buffer that training changes), the torch floor and the step's
one foreach gradient scaling."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dlm.batch import Batch
from dlm.data import BlockLoader, as_blocks
from dlm.data.loader import PrefetchLoader
from dlm.distributed import mixed_precision

sys.path.insert(0, str(Path(__file__).parent))
from test_contracts import batch, build, loss  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCKS = as_blocks(np.arange(10_000, dtype=np.uint16), 16)  # 625 blocks: 100 batches of 8 cross epochs


def loaders(**kw):
    lengths = kw.pop("lengths", None)
    clean = kw.pop("clean", None)
    return (BlockLoader(BLOCKS, 8, seed=3, clean=clean, lengths=lengths),
            PrefetchLoader(BlockLoader(BLOCKS, 8, seed=3, clean=clean, lengths=lengths), **kw))


def same(a: Batch, b: Batch) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in ((a.x0, b.x0), (a.clean, b.clean), (a.pad, b.pad)))


@pytest.mark.parametrize("depth", [1, 3])
def test_the_batches_are_the_loaders_bit_for_bit(depth):
    rng = np.random.default_rng(0)
    clean = rng.random(BLOCKS.shape) < 0.3
    lengths = rng.integers(4, 17, len(BLOCKS))
    plain, ahead = loaders(depth=depth, clean=clean, lengths=lengths)
    try:
        for _ in range(100):
            a, b = plain.next_batch(), ahead.next_batch()
            assert same(a, b) and a.x0.dtype == b.x0.dtype
            assert ahead.state_dict() == plain.state_dict()  # the consumer's state, not the thread's
    finally:
        ahead.close()


def test_a_checkpointed_state_resumes_exactly_however_far_the_thread_read():
    plain, ahead = loaders(depth=4)
    seen = [plain.next_batch().x0 for _ in range(100)]
    for i in range(37):
        assert torch.equal(ahead.next_batch().x0, seen[i])
    state = ahead.state_dict()
    ahead.close()  # the thread had read up to 4 batches more: they are dropped
    assert ahead.loader.state_dict() == state
    assert torch.equal(ahead.next_batch().x0, seen[37])  # and it carries on from the consumer's place
    resumed = PrefetchLoader(BlockLoader(BLOCKS, 8, seed=3))
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch().x0, s) for s in seen[37:])
    ahead.load_state_dict(state)  # a resume into a loader already running
    assert all(torch.equal(ahead.next_batch().x0, s) for s in seen[37:60])
    for one in (ahead, resumed):
        one.close()
        assert one._thread is None


def test_an_error_while_reading_ahead_reaches_the_consumer():
    broken = PrefetchLoader(BlockLoader(BLOCKS, 8, seed=0, clean=np.zeros((3, 16), dtype=bool)))  # too few rows
    with pytest.raises(IndexError):
        broken.next_batch()
    assert broken._thread is None


def test_fsdp2_policy_is_bf16_parameters_and_float32_reduction_on_cuda_only():
    cuda = mixed_precision(torch.device("cuda"))
    assert cuda.param_dtype == torch.bfloat16 and cuda.reduce_dtype == torch.float32
    cpu = mixed_precision(torch.device("cpu"))
    assert cpu.param_dtype is None and cpu.reduce_dtype is None


@pytest.mark.parametrize("process", ["causal", "masked", "uniform", "d3pm-absorbing", "hybrid", "gaussian"])
def test_no_model_has_a_buffer_that_training_changes(process):
    """What lets DDP skip broadcasting buffers (``broadcast_buffers=False``): every buffer of a
    model is the same on every rank (built alike) and a training step leaves it unchanged."""
    fam, model = build(process)
    _, twin = build(process)
    model.train()
    before = {k: v.clone() for k, v in model.named_buffers()}
    loss(fam, model, batch()).nats.sum().backward()
    assert {k: v for k, v in model.named_buffers()}.keys() == before.keys()
    for (k, v), (_, w) in zip(model.named_buffers(), twin.named_buffers()):
        assert torch.equal(v, before[k]) and torch.equal(v, w), k


def test_ddp_wraps_without_buffer_broadcasts_and_shutdown_releases_the_reducer():
    """Dist.wrap's DDP skips the per-forward buffer sync, without torch's deprecation warning;
    Dist.shutdown frees the wrapper's reducer before leaving the group (a reducer freed after
    it would destroy the Gloo group holding the GIL: a hang at exit, see Dist.shutdown).
    A real one-process Gloo group stands in for torchrun's world (Dist only asks it to be >1)."""
    import warnings

    from dlm.distributed import Dist

    _, model = build("masked")
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        dist = Dist(rank=0, world=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            net = dist.wrap(model)
        synced = getattr(net, "forward_sync_buffers", getattr(net, "broadcast_buffers", None))
        assert synced is False
        assert "reducer" in net.__dict__
        dist.shutdown()
        assert not torch.distributed.is_initialized()
        assert "reducer" not in net.__dict__ and "logger" not in net.__dict__
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_the_torch_floor_is_2_5_and_this_machines_build_is_taken():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    lo, hi = re.search(r'"torch>=([\d.]+),<([\d.]+)"', text).groups()
    assert lo == "2.5"
    version = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    assert tuple(int(x) for x in lo.split(".")) <= version < tuple(int(x) for x in hi.split("."))


def test_the_step_scales_every_gradient_by_world_over_count():
    """accumulate_gradients' one foreach call: the gradient of Σ nats / Σ count, as the loop
    over tensors gave it."""
    from dlm.distributed import Dist
    from dlm.trainer.step import accumulate_gradients

    fam, model = build("masked")
    b = batch()
    loss_value = accumulate_gradients(fam, model, model, [b], torch.Generator().manual_seed(5), Dist(),
                                      torch.device("cpu"))
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    s = fam.loss(model, b, torch.Generator().manual_seed(5))
    (s.nats.sum() / s.count.sum()).backward()
    assert got and got.keys() == {k for k, p in model.named_parameters() if p.grad is not None}
    for k, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[k], p.grad, rtol=1e-5, atol=1e-7, msg=k)
    torch.testing.assert_close(loss_value.float(), (s.nats.sum() / s.count.sum()).detach(), rtol=1e-5, atol=1e-6)
