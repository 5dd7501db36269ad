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
