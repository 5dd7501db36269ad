"""MFU counts the work actually done: the output layer only at the positions it ran on (every
one for AR and with static shapes; the masked ones for MDLM's gathered head)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from dlm.backbones import Transformer, TransformerConfig
from dlm.batch import Batch
from dlm.flops import flops_per_token, head_params
from dlm.trainer.throughput import Throughput

sys.path.insert(0, str(Path(__file__).parent))
from helpers import TINY, run  # noqa: E402
from synccount import V, tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_flops_per_token_on_a_known_model():
    """1 layer, d = 8, 50 tokens padded to 64 rows: N and H counted by hand."""
    cfg = TransformerConfig(vocab_in=50, vocab_out=50, n_layer=1, n_head=2, d_model=8, vocab_multiple=64)
    model = Transformer(cfg)
    d, rows = 8, 64
    head = rows * d + rows
    assert head_params(model) == head
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embed."))
    full = 6 * n + 12 * 1 * d * 32
    assert flops_per_token(model, 32) == full
    assert flops_per_token(model, 32, head_share=0.25) == full - 6 * head * 0.75
    assert flops_per_token(model, 32, head_share=0.0) == 6 * (n - head) + 12 * d * 32


def test_throughput_scales_the_head_by_its_share_of_the_tokens():
    rows = [0]
    tp = Throughput(1000.0, 1.0, torch.device("cpu"), compiling=False, probe_s=0.0, head_flops=600.0,
                    head_rows=lambda: rows[0])
    tp.start(0.0)
    rows[0] += 30  # the output layer ran on 30 of the step's 120 tokens
    tp.step_done(0.0, 120, None)
    rec = tp.fields(2.0)
    assert rec["head_share"] == pytest.approx(0.25)
    assert rec["mfu"] == pytest.approx(60.0 * (1000.0 - 600.0 * 0.75) / 1e12)  # 60 tokens/s
    untracked = Throughput(1000.0, 1.0, torch.device("cpu"), compiling=False, probe_s=0.0, head_flops=600.0)
    untracked.start(0.0)
    untracked.step_done(0.0, 120, None)
    assert untracked.fields(2.0)["mfu"] == pytest.approx(60.0 * 1000.0 / 1e12)


@pytest.mark.parametrize("family,static", [("ar", False), ("mdlm", False), ("mdlm", True)])
def test_the_model_counts_the_positions_its_head_ran_on(family, static):
    fam, model = tiny(family)
    fam.cfg.train.static_shapes = static
    model.train()
    x0 = torch.randint(0, V, (4, 32), generator=torch.Generator().manual_seed(0))
    before = model.head_positions
    s = fam.loss(model, Batch(x0), torch.Generator().manual_seed(1))
    ran = model.head_positions - before
    if family == "ar" or static:
        assert ran == 4 * 32
    else:  # the masked positions alone
        assert 0 < ran < 4 * 32
    with torch.no_grad():
        fam.loss(model, Batch(x0), torch.Generator().manual_seed(1))
    assert model.head_positions - before == ran  # evaluation passes are not training work
    assert s.nats.shape == (4,)


def test_mdlm_reports_its_head_share_and_ar_all_of_it(tmp_path, capsys):
    corpus = tmp_path / "text.txt"
    corpus.write_text("".join(f"To be, or not to be, that is the question {i}.\n" for i in range(300)))
    shares = {}
    for family in ("ar", "mdlm"):
        out = tmp_path / family
        code, _, err = run(["train", "--family", family, "--data", str(corpus), "--out", str(out), "--steps", "2",
                            *TINY, "train.log_every=1", "train.peak_tflops=1", "train.static_shapes=false"], capsys)
        assert code == 0, err
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        shares[family] = [r["head_share"] for r in rows if "head_share" in r]
    assert shares["ar"] and all(s == 1.0 for s in shares["ar"])
    assert shares["mdlm"] and all(0.0 < s < 1.0 for s in shares["mdlm"])
