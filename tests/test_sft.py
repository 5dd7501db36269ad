"""Instruction fine-tuning end to end: the built-in ``shakespeare-next-speaker`` task, a tiny
base run fine-tuned through the CLI (``--init-from``), answers that stop at end-of-text,
``dlm eval --answers``, and one clear line for every kind of bad input."""

import json
import re

import pytest

from dlm.data.corpora import load_corpus
from dlm.data.tasks import (LINES_PER_SPEECH, MAX_LINE_CHARS, PAIR_TASKS, TRAIN_CAP, VAL_CAP, is_speaker_line,
                            speaker_baselines)
from dlm.runs import load_run
from helpers import TINY, one_line_error, run

TASK = "shakespeare-next-speaker"


# ---- the built-in task ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def task():
    return PAIR_TASKS.get(TASK)(0.05)


def test_next_speaker_rows_are_well_formed(task):
    assert len(task["train"]) == TRAIN_CAP and len(task["val"]) == VAL_CAP
    assert PAIR_TASKS.get(TASK)(0.05) == task  # deterministic
    for split, pairs in task.items():
        for p in pairs:
            assert p.prompt.endswith("\n\n") and not p.prompt.endswith("\n\n\n"), p
            assert is_speaker_line(p.response), p
            speeches = p.prompt[:-2].split("\n\n")
            assert len(speeches) == 2, p
            for speech in speeches:
                speaker, *lines = speech.split("\n")
                assert is_speaker_line(speaker) and 1 <= len(lines) <= LINES_PER_SPEECH, p
                assert all(line.strip() and len(line) <= MAX_LINE_CHARS for line in lines), p
            assert p.where.startswith(f"{TASK}:{split}:")
    for line in ("JULIET.", "FIRST LORD.", "SIR TOBY.", "KING RICHARD."):
        assert is_speaker_line(line)
    for line in ("SCENE V.", "ACT II.", "EPILOGUE.", "Ham.", "LYSANDER", "[Exeunt.]", "ACT II. SCENE I."):
        assert not is_speaker_line(line)


def test_next_speaker_val_text_never_in_train(task):
    """Each pair's turn (the last line of the second speech, cut as the task cuts it, then the
    next speaker line) occurs in its own split's text; no prompt is in both splits."""
    from dlm.data.tasks import _cut_line

    corpus = load_corpus("shakespeare", 0.05)

    def turns(split):
        blocks = [b for doc in corpus.docs(split) for b in doc.split("\n\n")]
        return {(_cut_line(a.split("\n")[-1]), b.split("\n")[0]) for a, b in zip(blocks, blocks[1:])}

    for split in ("train", "val"):
        seen = turns(split)
        assert all((p.prompt[:-2].split("\n")[-1], p.response) in seen for p in task[split])
    assert not {p.prompt for p in task["train"]} & {p.prompt for p in task["val"]}
    # characters of the val plays (Macbeth, Twelfth Night) only: never in a train pair
    val_only = {"MACBETH.", "LADY MACBETH.", "BANQUO.", "SIR TOBY.", "MALVOLIO.", "SIR ANDREW."}
    assert val_only & {p.response for p in task["val"]}
    assert not any(name in p.prompt or name == p.response for p in task["train"] for name in val_only)


def test_next_speaker_baselines_are_the_documented_ones():
    """The chance-level figures in dlm.data.tasks' docstring."""
    b = speaker_baselines()
    assert b["pairs"] == VAL_CAP
    assert (b["two_turns_back"], b["most_frequent_train"], b["most_frequent_val"]) == (0.716, 0.0, 0.098)
    assert (b["most_frequent_train_speaker"], b["most_frequent_val_speaker"]) == ("KING.", "SIR TOBY.")
    b = speaker_baselines(limit=400)
    assert (b["two_turns_back"], b["most_frequent_train"], b["most_frequent_val"]) == (0.72, 0.0, 0.1025)
    import dlm.data.tasks as tasks

    for figure in ("71.6%", "9.8%", "72.0%", "10.25%", "18,226", "1,175", "4,000", "500"):
        assert figure in tasks.__doc__, figure


def test_next_speaker_prompts_fit_the_quickstart_rows(task, tmp_path):
    """Every prompt and its answer fit a 128-token row of a BPE tokenizer of the quickstart's size."""
    from dlm.data.pairs import encode_pairs
    from dlm.data.tokenizers import TOKENIZERS

    corpus = load_corpus("shakespeare", 0.05)
    tok = TOKENIZERS.get("bpe").build(corpus.docs("train"), 4096)
    enc = encode_pairs(task["train"] + task["val"], tok, 128)
    assert enc.truncated == 0 and enc.clean.sum(1).max() < 100


# ---- fine-tuning through the command line ------------------------------------------------------

PROMPTS = [f"To be {i}, " for i in range(60)]  # characters the base corpus has
ANSWER = "not to be."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    f = tmp_path_factory.mktemp("corpus") / "text.txt"
    f.write_text("".join(f"To be, or not to be, that is the question {i}.\n" for i in range(400)))
    return f


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    f = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"prompt": prompt, "response": ANSWER} for prompt in PROMPTS]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


@pytest.fixture(scope="module")
def bases(corpus, tmp_path_factory):
    """A tiny pretrained run of each family, trained once for the module."""
    from dlm.cli import main

    out = {}
    for family in ("mdlm", "ar", "usdm"):
        d = tmp_path_factory.mktemp(f"base-{family}") / "run"
        assert main(["train", "--family", family, "--data", str(corpus), "--out", str(d), "--steps", "4", *TINY]) == 0
        out[family] = d
    return out


@pytest.fixture(scope="module")
def tuned(bases, pairs, tmp_path_factory):
    """Each base fine-tuned on the pairs file through ``dlm train --init-from`` (12 val rows)."""
    from dlm.cli import main

    out = {}
    for family, base in bases.items():
        d = tmp_path_factory.mktemp(f"sft-{family}") / "run"
        assert main(["train", "--init-from", str(base), "--data", str(pairs), "--out", str(d), "--steps", "12",
                     "--batch-size", "8", "--quiet", "train.lr=3e-3", "data.val_fraction=0.2"]) == 0
        out[family] = d
    return out


@pytest.mark.parametrize("family", ["mdlm", "ar"])
def test_sample_keeps_the_prompt_and_stops_at_end_of_text(family, tuned, capsys):
    """``dlm sample --prompt``: each text is the prompt, then the generated tokens up to the
    first end-of-text and nothing after (the same draw, redone here with the same seed)."""
    import torch

    from dlm.service import generate, sampler_settings
    from dlm.service.training import answer_width

    r = load_run(tuned[family], "cpu")
    assert r.cfg.family == family and r.cfg.train.init_from and r.cfg.data.data.endswith("pairs.jsonl")
    prompt = PROMPTS[3]
    code, stdout, err = run(["sample", str(tuned[family]), "--prompt", prompt, "--num", "6", "--steps", "16",
                             "--temperature", "1.5", "--seed", "3", "--json"], capsys)
    assert code == 0, err
    texts = json.loads(stdout)["samples"]
    ids = torch.as_tensor(r.tokenizer.encode(prompt))
    # in rows as long as the longest training row (data.sft_length=batch; ar: seq_len, its own rows)
    tokens, _, _ = generate(r, 6, answer_width(r, len(ids)), ids, sampler_settings(r, 16, 1.5), 3)
    eos, n = r.tokenizer.eos_id, len(ids)
    for text, row in zip(texts, tokens.tolist()):
        assert row[:n] == ids.tolist() and text.startswith(prompt)
        answer = row[n:]
        if eos in answer:
            answer = answer[: answer.index(eos)]
        assert text == prompt + r.tokenizer.decode(answer)  # cut at the first end-of-text
    assert eos in sum(tokens.tolist(), [])  # the fine-tuned model does end its answers


@pytest.mark.parametrize("family", ["mdlm", "ar", "usdm"])
def test_eval_answers(family, tuned, capsys):
    code, stdout, err = run(["eval", str(tuned[family]), "--answers", "5", "--steps", "16", "--json",
                             "--mc-samples", "1"], capsys)
    assert code == 0, err
    r = json.loads(stdout)
    assert r["answers"] == 5 and r["conditional"] is True  # with the conditional likelihood
    for key in ("answer_exact_match", "answer_token_accuracy"):
        assert 0.0 <= r[key] <= 1.0 and r[key + "_stderr"] >= 0
    assert r["answer_temperature"] == 0.0
    ex = r["answer_examples"]
    assert len(ex) == 3 and all(e["reference"] == ANSWER for e in ex)
    assert all(e["prompt_tail"] in PROMPTS for e in ex)
    # text output, answers only
    code, stdout, err = run(["eval", str(tuned[family]), "--answers", "2", "--steps", "8", "--no-likelihood"], capsys)
    assert code == 0, err
    assert "exact match" in stdout and "nll" not in stdout


def test_answer_metrics_count_what_they_say(tuned):
    """Exact match and token accuracy against hand-made generations."""
    import numpy as np
    import torch

    from dlm.data import prepare_data
    from dlm.evaluate import answer_accuracy

    r = load_run(tuned["mdlm"], "cpu")
    rows, clean = prepare_data(r.cfg.data, r.tokenizer).rows("val", r.cfg.data.seq_len)
    rows, clean = rows[:4], clean[:4]

    class Oracle:  # a "family" whose sampler writes given rows (the reference, or a broken copy)
        def __init__(self, out):
            self.out = out

        def sample(self, model, given, mask, generator, settings=None):
            assert (given[~mask] == 0).all()  # the reference answer is never shown
            idx = [next(i for i in range(len(rows)) if torch.equal(given[j][mask[j]], torch.from_numpy(rows[i][clean[i]])))
                   for j in range(len(given))]
            return torch.from_numpy(self.out[idx]), 1

    gen = torch.Generator().manual_seed(0)
    perfect = answer_accuracy(Oracle(rows), r.model, rows, clean, r.tokenizer, gen, batch_size=3)
    assert perfect["answer_exact_match"] == 1.0 and perfect["answer_token_accuracy"] == 1.0
    n_prompt = clean.sum(1)
    target = len(r.tokenizer.encode(ANSWER)) + 1  # the response and the end-of-text after it
    assert perfect["answer_target_tokens"] == 4 * target
    broken = rows.copy()
    broken[0, n_prompt[0]] = r.tokenizer.encode("x")[0]  # first answer token wrong in row 0
    broken[1, n_prompt[1] + target - 1] = r.tokenizer.encode("o")[0]  # row 1 does not stop: answer runs on
    res = answer_accuracy(Oracle(broken), r.model, rows, clean, r.tokenizer, gen, batch_size=2)
    assert res["answer_exact_match"] == 0.5
    assert res["answer_token_accuracy"] == pytest.approx((4 * target - 2) / (4 * target))
    assert np.isfinite(res["answer_token_accuracy_stderr"]) and res["answer_token_accuracy_stderr"] > 0


# ---- bad input: one line, exit 2, no run folder -------------------------------------------------

def _bad_pairs(tmp_path, rows, name="bad.jsonl"):
    f = tmp_path / name
    f.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return f


@pytest.mark.parametrize("rows,line,fragment", [
    ([{"prompt": "To be? ", "response": ANSWER}, {"text": "a text row"}], 2, "\"prompt\" and \"response\""),
    ([{"prompt": "To be? ", "response": ANSWER}, {"question": "To be?"}], 2, "\"prompt\" and \"response\""),
    ([{"prompt": "To be? ", "response": ANSWER}, {"prompt": "To be? ", "response": "  "}], 2, "the response is empty"),
    ([{"prompt": "To be? ", "response": ANSWER}, {"prompt": "To be, or not to be, " * 3, "response": ANSWER}], 2,
     "shorter than the sequence length 32"),
])
def test_bad_pairs_file(rows, line, fragment, bases, tmp_path, capsys):
    data = _bad_pairs(tmp_path, rows)
    out = tmp_path / "out"
    code, _, err = run(["train", "--init-from", str(bases["mdlm"]), "--data", str(data), "--out", str(out),
                        "--steps", "2", "--quiet"], capsys)
    one_line_error(code, err, f"{data}:{line}", fragment)
    assert not out.exists()


@pytest.mark.parametrize("extra,fragment", [
    (["--tokenizer", "byte"], "tokenizer"),
    (["--family", "ar"], "'mdlm' run, not 'ar'"),
])
def test_init_from_refuses_another_tokenizer_or_family(extra, fragment, bases, pairs, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["train", "--init-from", str(bases["mdlm"]), "--data", str(pairs), "--out", str(out),
                        "--steps", "2", "--quiet", *extra], capsys)
    one_line_error(code, err, fragment)
    assert not out.exists()


def test_init_from_a_folder_that_is_not_a_run(pairs, tmp_path, capsys):
    source = tmp_path / "not-a-run"
    source.mkdir()
    (source / "notes.txt").write_text("hello")
    out = tmp_path / "out"
    code, _, err = run(["train", "--init-from", str(source), "--data", str(pairs), "--out", str(out),
                        "--steps", "2", "--quiet"], capsys)
    one_line_error(code, err, str(source))
    assert not out.exists()
    code, _, err = run(["train", "--init-from", str(tmp_path / "missing"), "--data", str(pairs), "--out", str(out),
                        "--steps", "2", "--quiet"], capsys)
    one_line_error(code, err)
    assert not out.exists()


def test_eval_answers_bad_input(bases, tuned, capsys):
    code, _, err = run(["eval", str(bases["mdlm"]), "--answers", "3"], capsys)
    one_line_error(code, err, "--answers needs a run fine-tuned on prompt/response pairs")
    code, _, err = run(["eval", str(tuned["mdlm"]), "--answers", "0"], capsys)
    one_line_error(code, err, "--answers must be ≥ 1, got 0")
    assert re.search("--answers", err)
