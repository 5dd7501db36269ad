"""DiffuLLaMA's attention-mask annealing (``train.attention_anneal_steps``): a pretrained causal
LM adapted to diffusion starts from causal attention and opens to full attention over N steps.
Tiny random Llama (tests/test_pretrained.py), no network."""

from __future__ import annotations

import pytest
import torch

from dlm.distributed import Dist
from dlm.service.pretrained import pretrained_config
from dlm.trainer import Trainer
from dlm.trainer.step import annealed_attention
from helpers import back_to_step, one_line_error, run
from test_pretrained import V, corpus_file, family_of, folders, reference, tokens  # noqa: F401

transformers = pytest.importorskip("transformers")


def test_the_mask_opens_from_causal_to_full():
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    assert torch.equal(annealed_attention(0, 0, 8, 16), causal)
    for s in range(1, 8):  # about s / 8 of the 120 later keys, always every earlier one
        mask = annealed_attention(0, s, 8, 16)
        assert mask[causal].all() and abs(mask[~causal].float().mean().item() - s / 8) < 0.15
    assert annealed_attention(0, 8, 8, 16) is None and annealed_attention(0, 9, 8, 16) is None  # full
    assert torch.equal(annealed_attention(3, 4, 8, 16), annealed_attention(3, 4, 8, 16))  # drawn from (seed, step)
    assert not torch.equal(annealed_attention(3, 4, 8, 16), annealed_attention(4, 4, 8, 16))


def test_the_first_step_attends_causally_and_the_last_fully(folders, tmp_path):
    """The trainer's mask at each step, and what it does to the adapted model: at step 0 its
    logits are the AR model's, causal (shifted); after the annealing they are bidirectional."""
    cfg = pretrained_config(f"hf:{folders['llama']}", flags={
        "family": "mdlm", "data.seq_len": 16, "data.data": str(corpus_file(tmp_path)), "train.steps": 4,
        "train.batch_size": 2, "train.attention_anneal_steps": 2, "train.device": "cpu"})
    trainer = Trainer(cfg, tmp_path / "run", False, False, None, torch.device("cpu"), Dist())
    model, ref = trainer.model, reference(folders["llama"])
    seen = []
    for _ in range(3):
        trainer.train_step()
        seen.append(model.allowed)
    assert torch.equal(seen[0], torch.ones(16, 16, dtype=torch.bool).tril())
    assert seen[1] is not None and seen[1].sum() > seen[0].sum() and not seen[1].all()
    assert seen[2] is None  # step 2 = attention_anneal_steps: full attention
    fresh, _ = family_of(folders["llama"], "mdlm")
    net = fresh.build_model()
    x = tokens()
    with torch.no_grad():
        net.train().anneal_attention(seen[0])
        causal = ref(inputs_embeds=net.embed(x)).logits
        torch.testing.assert_close(net(x)[:, 1:], causal[:, :-1], rtol=0, atol=1e-5)
        net.anneal_attention(None)
        full = ref(inputs_embeds=net.embed(x), attention_mask=torch.ones(3, 1, 16, 16, dtype=torch.bool)).logits
        torch.testing.assert_close(net(x)[:, 1:], full[:, :-1], rtol=0, atol=1e-5)
        net.eval().anneal_attention(seen[0])  # evaluation and sampling: always full attention
        torch.testing.assert_close(net(x)[:, 1:], full[:, :-1], rtol=0, atol=1e-5)


def test_a_resume_mid_annealing_is_exact(folders, tmp_path, capsys):
    from dlm.checkpoint import load_checkpoint

    out = tmp_path / "run"
    common = ["--data", str(corpus_file(tmp_path)), "--seq-len", "16", "--batch-size", "2", "--quiet",
              "train.ckpt_every=2", "train.keep_checkpoints=3", "train.attention_anneal_steps=4"]
    code, _, err = run(["train", "--init-from", f"hf:{folders['llama']}", "--family", "mdlm", "--steps", "4",
                        "--out", str(out), *common], capsys)
    assert code == 0, err
    resumed = back_to_step(out, tmp_path / "resumed", 2)
    code, _, err = run(["train", "--out", str(resumed), "--resume", "--quiet"], capsys)
    assert code == 0, err
    a, b = load_checkpoint(out, with_trainer=False), load_checkpoint(resumed, with_trainer=False)
    assert a.step == b.step == 4
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)


@pytest.mark.parametrize("setup,fragment", [
    ("ar", "for a pretrained causal LM adapted to diffusion"),
    ("scratch", "for a pretrained causal LM adapted to diffusion"),
    ("negative", "train.attention_anneal_steps"),
])
def test_annealing_where_it_does_not_apply_is_one_line(folders, tmp_path, capsys, setup, fragment):
    from helpers import TINY

    out = tmp_path / "out"
    if setup == "scratch":
        args = ["train", "--family", "mdlm", *TINY, "--steps", "1", "train.attention_anneal_steps=3"]
    else:
        args = ["train", "--init-from", f"hf:{folders['llama']}", "--family", "ar" if setup == "ar" else "mdlm",
                "--data", str(corpus_file(tmp_path)), "--seq-len", "16", "--steps", "1", "--quiet",
                f"train.attention_anneal_steps={3 if setup == 'ar' else -1}"]
    one_line_error(*run([*args, "--out", str(out)], capsys)[::2], fragment)
    assert not out.exists()
