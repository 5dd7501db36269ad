"""Helpers shared by the command-line tests."""

from dlm.cli import main

# a model and data small enough for a CLI round trip in a second or two
TINY = ["--size", "tiny", "--seq-len", "32", "--batch-size", "8", "--tokenizer", "char", "--seed", "0", "--quiet"]


def run(argv, capsys):
    """(exit code, stdout, stderr) of ``dlm ARGV`` run in-process."""
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *fragments):
    """The CLI failed the way bad input must: exit 2 and one line ``dlm: error: …``."""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("dlm: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def score(objective, logits, x0, xt, t, process, noised=None, target=None):
    """An objective's Scored (nats, count) from full (B, L, V) logits, the way a family calls it."""
    import torch

    from dlm.objectives import Corrupted

    target = torch.ones_like(x0, dtype=torch.bool) if target is None else target
    c = Corrupted(x0, xt, t, target, noised)
    where = objective.score_mask(c)
    return objective(logits[where], c, where, process)


def back_to_step(src, dst, step: int, **config):
    """A copy of run folder ``src`` as it was at ``step`` (its later checkpoints gone; a resume
    trims the metrics), with ``config`` set in its ``train`` section of config.yaml."""
    import shutil

    from dlm.checkpoint import read_run_config
    from dlm.config import save_yaml

    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    (dst / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
    cfg = read_run_config(dst)
    for key, value in config.items():
        assert hasattr(cfg.train, key), key
        setattr(cfg.train, key, value)
    (dst / "config.yaml").write_text(save_yaml(cfg))
    return dst


def tiny_judge(folder):
    """A random 1-layer GPT-2 with the real GPT-2 tokenizer, saved in ``folder`` as a local
    Hugging Face judge (fast to load; its Gen PPL means nothing, its plumbing is real)."""
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from dlm.data.tokenizers import gpt2_files

    vocab, merges = gpt2_files()
    shutil.copy(vocab, folder / "vocab.json")
    shutil.copy(merges, folder / "merges.txt")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64)).save_pretrained(folder)
    return folder
