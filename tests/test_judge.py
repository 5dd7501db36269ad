"""Sample quality: the judge (default SmolLM2 and a local HF folder), the Gen PPL aggregation,
the entropy of samples, and `dlm eval --samples` end to end."""

import json
import math
import random

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from dlm import judge as judge_mod  # noqa: E402
from dlm.cli import main  # noqa: E402
from dlm.data.tokenizers import ByteTokenizer  # noqa: E402
from dlm.errors import DlmError  # noqa: E402
from dlm.evaluate import generative_perplexity, sample_documents, sample_entropy  # noqa: E402
from dlm.judge import load_judge  # noqa: E402
from helpers import TINY, one_line_error, tiny_judge  # noqa: E402
from helpers import run as run_cli  # noqa: E402

FLUENT = (
    "The old man walked slowly down the road toward the village. It had rained all night, and the "
    "fields on either side were green and wet. He stopped at the bridge to watch the river, which was "
    "higher than he had seen it in years, and then went on to the market to buy bread."
)


@pytest.fixture(scope="module")
def judge():
    """The default judge, converted once per test session into the session's fresh DLM_CACHE."""
    return load_judge()


@pytest.fixture(scope="module")
def tiny_judge_dir(tmp_path_factory):
    """A random 1-layer GPT-2 with the real GPT-2 tokenizer, saved as a local HF folder."""
    return tiny_judge(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="module")
def mdlm_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("judge-run")
    corpus = d / "text.txt"
    corpus.write_text("".join(f"To be, or not to be, that is the question {i}.\n" for i in range(400)))
    out = d / "run"
    assert main(["train", "--family", "mdlm", "--data", str(corpus), "--out", str(out), "--steps", "3", *TINY]) == 0
    return out


# ── the default judge ──────────────────────────────────────────────────────────────────────


def test_default_judge_prefers_fluent_text(judge):
    words = FLUENT.split()
    random.Random(0).shuffle(words)
    fluent = generative_perplexity(judge, [FLUENT])["gen_ppl"]
    shuffled = generative_perplexity(judge, [" ".join(words)])["gen_ppl"]
    assert fluent < 30
    assert shuffled > 10 * fluent


def test_gen_ppl_is_the_corpus_mean_over_judge_tokens(judge):
    texts = [FLUENT, "Bread."]
    by_hand_nll, by_hand_n = [], []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[judge.context_id, *judge.tokenizer(text, add_special_tokens=False)["input_ids"]]])
            logits = judge.model(input_ids=ids).logits[0, :-1]
            by_hand_nll.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item())
            by_hand_n.append(ids.shape[1] - 1)
    r = generative_perplexity(judge, texts)  # both texts in one padded batch
    assert r["judge_tokens"] == sum(by_hand_n)
    assert r["judge_nll"] == pytest.approx(sum(by_hand_nll) / sum(by_hand_n), rel=1e-4)
    assert r["gen_ppl"] == pytest.approx(math.exp(r["judge_nll"]), rel=1e-9)
    mean_of_ppls = np.mean([math.exp(s / n) for s, n in zip(by_hand_nll, by_hand_n)])
    assert abs(r["gen_ppl"] - mean_of_ppls) > 1  # a different aggregation would be caught


def test_samples_split_at_end_of_text_and_eos_is_not_scored(judge):
    tok = ByteTokenizer()
    eos = tok.eos_id
    a, b, c = "It had rained all night.", "He went to the market.", "The river was high."

    def ids(text):
        return list(tok.encode(text))

    L = 64
    row1 = ids(a) + [eos] + ids(b) + [eos, eos]
    row2 = [eos] + ids(c)
    tokens = np.array([row + [eos] * (L - len(row)) for row in (row1, row2)])
    docs = sample_documents(tokens, tok)
    assert docs == [a, b, c]  # split at end-of-text, empty documents dropped
    r = generative_perplexity(judge, docs)
    n = sum(len(judge.tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs)
    assert r["judge_tokens"] == n and r["judge_documents"] == 3
    nll, count = judge.score(docs)
    singles = [judge.score([d]) for d in docs]  # padding in a batch changes nothing
    assert np.allclose(nll, [s[0][0] for s in singles], rtol=1e-4)
    assert list(count) == [s[1][0] for s in singles]
    assert math.isnan(generative_perplexity(judge, [])["gen_ppl"])


# ── a local Hugging Face folder as the judge ───────────────────────────────────────────────


def test_local_folder_judge_chunks_long_documents(tiny_judge_dir):
    j = load_judge(str(tiny_judge_dir))
    assert j.max_len == 64 and j.context_id == 50256  # GPT-2: <|endoftext|> is its BOS
    long = " ".join([FLUENT] * 3)
    n = len(j.tokenizer(long, add_special_tokens=False)["input_ids"])
    assert n > 64
    r = generative_perplexity(j, [long, "Bread."])
    assert r["judge_tokens"] == n + len(j.tokenizer("Bread.")["input_ids"])
    assert math.isfinite(r["gen_ppl"]) and r["gen_ppl"] > 1


def test_missing_judge_is_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(DlmError, match="neither a named judge"):
        load_judge(str(tmp_path / "nonexistent"))
    monkeypatch.setenv("DLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(judge_mod.JUDGES, "absent", judge_mod.GgufJudge("no_such_package_xyz", "m.gguf", "pip install absent"))
    with pytest.raises(DlmError, match="pip install absent"):
        load_judge("absent")
    real = judge_mod.importlib.util.find_spec
    monkeypatch.setattr(judge_mod.importlib.util, "find_spec", lambda n, *a: None if n == "transformers" else real(n, *a))
    with pytest.raises(DlmError, match=r"pip install 'dlm\[judge\]'"):
        load_judge()


# ── entropy of samples ─────────────────────────────────────────────────────────────────────


def test_sample_entropy_known_values():
    L, eos = 16, 99
    same = np.full(L, 7)
    distinct = np.arange(L)
    with_eos = np.array([*range(8), *[eos] * 8])
    assert sample_entropy(same[None], eos)["entropy"] == pytest.approx(0.0)
    assert sample_entropy(distinct[None], eos)["entropy"] == pytest.approx(math.log(L))
    assert sample_entropy(with_eos[None], eos)["entropy"] == pytest.approx(math.log(8))  # eos excluded
    assert sample_entropy(with_eos[None], None)["entropy"] == pytest.approx(math.log(2) + 0.5 * math.log(8))
    r = sample_entropy(np.stack([same, distinct]), eos)
    assert r["entropy"] == pytest.approx(math.log(L) / 2) and r["entropy_std"] == pytest.approx(math.log(L) / 2)
    assert sample_entropy(distinct[None], eos, prompt_len=8)["entropy"] == pytest.approx(math.log(8))


# ── `dlm eval --samples` ───────────────────────────────────────────────────────────────────


def test_eval_samples_end_to_end(mdlm_run, judge, tiny_judge_dir, capsys):
    code, out, err = run_cli(["eval", str(mdlm_run), "--samples", "4", "--steps", "8", "--sample-batch", "3", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert {"nll", "bits_per_byte"} <= set(r)  # the likelihood is still there
    assert r["samples"] == 4 and r["sample_steps"] == 8 and r["judge"] == "smollm2-135m"
    for k in ("gen_ppl", "judge_nll", "entropy", "entropy_std", "sample_tokens_per_s"):
        assert math.isfinite(r[k]), k
    assert r["judge_tokens"] > 0 and r["sample_nfe"] >= 1
    assert 0 < r["entropy"] <= math.log(32)

    code, out, err = run_cli(["eval", str(mdlm_run), "--samples", "2", "--steps", "4", "--no-likelihood",
                              "--judge", str(tiny_judge_dir)], capsys)
    assert code == 0, err
    assert "gen ppl" in out and "entropy" in out and "nll" not in out


def test_eval_samples_bad_input(mdlm_run, capsys):
    code, _, err = run_cli(["eval", str(mdlm_run), "--samples", "2", "--judge", "/nonexistent", "--no-likelihood"], capsys)
    one_line_error(code, err, "/nonexistent")
    one_line_error(*run_cli(["eval", str(mdlm_run), "--samples", "0"], capsys)[::2], "--samples")
    one_line_error(*run_cli(["eval", str(mdlm_run), "--samples", "2", "--steps", "0"], capsys)[::2], "--steps")
    one_line_error(*run_cli(["eval", str(mdlm_run), "--no-likelihood"], capsys)[::2], "--samples")
