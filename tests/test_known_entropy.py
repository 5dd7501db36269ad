"""A source whose entropy rate is known exactly: text from a small Markov chain.

No model's expected NLL on held-out text can go below the source's entropy rate H
(the first token of each block even costs the marginal entropy, which is larger), so a
likelihood or a likelihood *bound* that lands meaningfully below H is a bug: a missing
NELBO weight, a leak of x0 into the input, a wrong normalisation.
"""

import json
import math

import numpy as np
import pytest
import torch

from dlm.cli import main

K = 8  # symbols a..h


def markov_chain(seed: int = 0):
    rng = np.random.default_rng(seed)
    P = np.zeros((K, K))
    for i in range(K):
        succ = rng.choice(K, size=3, replace=False)
        P[i, succ] = rng.dirichlet(np.ones(3))
    evals, evecs = np.linalg.eig(P.T)
    pi = np.real(evecs[:, np.argmin(np.abs(evals - 1))])
    pi = pi / pi.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        H = float(-(pi[:, None] * np.where(P > 0, P * np.log(P), 0.0)).sum())
    return P, pi, H


def sample_text(P, pi, n: int, seed: int = 1) -> str:
    rng = np.random.default_rng(seed)
    state = rng.choice(K, p=pi)
    out = np.empty(n, dtype=np.int64)
    cdf = P.cumsum(1)
    u = rng.random(n)
    for i in range(n):
        out[i] = state
        state = min(int(np.searchsorted(cdf[state], u[i])), K - 1)
    return "".join(chr(ord("a") + s) for s in out)


def chain_file(folder) -> tuple:
    """The chain's text (240,000 symbols) in ``folder``/chain.txt, and its entropy rate H."""
    P, pi, H = markov_chain()
    f = folder / "chain.txt"
    f.write_text(sample_text(P, pi, 240_000))
    return f, H


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return chain_file(tmp_path_factory.mktemp("markov"))


def train_and_bound(path, out, family: str, steps: int, mc: int, extra, capsys) -> dict:
    """A tiny ``family`` model trained on the chain text ``path`` into ``out`` with the settings
    every known-entropy test shares, and its ``dlm eval --json`` on the held-out blocks."""
    code = main(["train", "--family", family, "--data", str(path), "--tokenizer", "char", "--size", "tiny",
                 "--seq-len", "64", "--batch-size", "32", "--steps", str(steps), "--lr", "3e-3", "--seed", "0",
                 "--out", str(out), "--quiet", "train.warmup_steps=20", *extra])
    assert code == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--json", "--max-tokens", "0", "--mc-samples", str(mc)]) == 0
    return json.loads(capsys.readouterr().out)


# d3pm: T = 50 and every step term in the bound (its exact NELBO, no stride); gidd: GIDD's ELBO
# with uniform noise (p_u = 0.1), its piece below ε included (docs/gidd.md)
@pytest.mark.parametrize("family,steps,mc,extra", [("ar", 150, 1, []), ("mdlm", 250, 8, []), ("usdm", 250, 8, []),
                                                   ("d3pm", 250, 1, ["process.steps=50"]),
                                                   ("gidd", 250, 8, ["process.p_u=0.1"])])
def test_held_out_nll_is_not_below_the_entropy_rate(source, tmp_path, capsys, family, steps, mc, extra):
    path, H = source
    assert 0.5 < H < math.log(3)  # three successors per state: H is well below log 8
    out = tmp_path / family
    r = train_and_bound(path, out, family, steps, mc, extra, capsys)
    assert r["tokens"] >= 10_000
    # never meaningfully below the entropy rate …
    assert r["nll"] > H - 3 * r["stderr"] - 0.01, (r["nll"], H, r["stderr"])
    # … and the model did learn: far below the uniform log 8 over the symbols
    assert r["nll"] < H + 0.5 * (math.log(K) - H), (r["nll"], H)

    # The conditional bound: given the first half of each block as clean context, the second
    # half costs exactly H per token for the source (a Markov chain forgets all but the last
    # symbol), so −log p(target | context) must not land below it either.
    c = conditional_nll(out, mc)
    assert c["tokens"] >= 5_000 and c["conditional"]
    assert c["nll"] > H - 3 * c["stderr"] - 0.01, (c["nll"], H, c["stderr"])
    assert c["nll"] < H + 0.5 * (math.log(K) - H), (c["nll"], H)


def conditional_nll(run_dir, mc):
    from dlm.data import prepare_data
    from dlm.evaluate import evaluate_likelihood
    from dlm.runs import load_run

    run = load_run(run_dir, "cpu")
    rows, _ = prepare_data(run.cfg.data, run.tokenizer).rows("val", run.cfg.data.seq_len)
    clean = np.zeros(rows.shape, dtype=bool)
    clean[:, : rows.shape[1] // 2] = True
    return evaluate_likelihood(run.family, run.model, rows, run.tokenizer, torch.Generator().manual_seed(0),
                               mc_samples=mc, clean=clean)
