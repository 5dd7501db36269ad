"""First use (issue 19): usage errors in one line, help texts from the registries, what
``dlm sample`` says about greedy copies and empty answers, a time budget that says it ended
training, and what SFT evaluation figures cover."""

import json

import pytest

from dlm.cli import build_parser, main
from helpers import TINY, one_line_error, run


# ---- usage errors: one line, rank 0 alone ---------------------------------------------------


@pytest.mark.parametrize("argv,fragment", [
    (["eval", "RUN", "--mc-samples", "abc"], "argument --mc-samples: invalid int value: 'abc'"),
    (["sample", "RUN", "--temperature", "hot"], "invalid float value: 'hot'"),
    (["train", "--parallel", "tp", "--out", "x"], "invalid choice: 'tp'"),
    (["train"], "the following arguments are required: --out"),
    ([], "the following arguments are required: command"),
    (["bench"], "the following arguments are required: bench"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["sample", "RUN", "--bogus"], "dlm sample: unrecognized arguments: --bogus"),
])
def test_a_usage_error_is_one_line(argv, fragment, capsys):
    one_line_error(*run(argv, capsys)[::2], fragment)


def test_under_torchrun_only_rank_0_prints_the_error(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    code, out, err = run(["eval", "RUN", "--mc-samples", "abc"], capsys)
    assert code == 2 and out == "" and err == ""
    code, out, err = run(["eval", "/nonexistent/run"], capsys)
    assert code == 2 and err == ""
    monkeypatch.setenv("RANK", "0")
    one_line_error(*run(["eval", "/nonexistent/run"], capsys)[::2])


def test_help_is_still_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--help"])
    assert e.value.code == 0
    assert "--temperature" in capsys.readouterr().out


# ---- help texts: every flag has one, choices come from the registries ------------------------


def _sub_parsers(parser, prefix="dlm"):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from _sub_parsers(sub, f"{prefix} {name}")


COMMANDS = ("dlm train", "dlm eval", "dlm sample", "dlm quickstart", "dlm lm-eval", "dlm bench compare")


def test_every_flag_has_help():
    import argparse

    missing = [f"{prog} {a.option_strings or a.dest}" for prog, sub in _sub_parsers(build_parser()) if prog in COMMANDS
               for a in sub._actions if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert not missing, missing


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_choices_in_help_come_from_the_registries(capsys):
    from dlm.families import FAMILIES
    from dlm.objectives import OBJECTIVES
    from dlm.samplers import SAMPLERS

    train = _help(["train"], capsys)
    for name in FAMILIES.names():
        assert name in train
    for name, process, _ in OBJECTIVES.entries():
        assert name in train, (name, process)
    for command in (["sample"], ["eval"]):
        text = _help(command, capsys)
        for name in FAMILIES.names():
            family = FAMILIES.get(name)
            processes = list(dict.fromkeys(family.process_choices.values())) or ["causal"]
            names = sorted({n for p in processes for n in SAMPLERS.names(p)})
            default = family.default_sampler
            listed = " | ".join([default] + [n for n in names if n != default])
            assert f"{name}: {listed}" in text, (name, listed)


# ---- dlm sample: greedy copies and empty answers are said ------------------------------------


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
    """A tiny AR run on documents 'ab' (end-of-text between them): after 'ab' it ends at once."""
    d = tmp_path_factory.mktemp("first-use")
    corpus = d / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": "ab"}) + "\n" for _ in range(3000)))
    out = d / "ar"
    assert main(["train", "--family", "ar", "--data", str(corpus), "--out", str(out), "--steps", "40", *TINY,
                 "train.lr=3e-3", "train.warmup_steps=5"]) == 0
    return out


def test_greedy_copies_and_empty_answers_are_said(ar_run, capsys):
    code, out, err = run(["sample", str(ar_run), "--prompt", "ab", "--temperature", "0", "--num", "3"], capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("dlm: note: ")]
    assert any("all 3 samples are the same text" in n for n in notes), err
    assert any("3 of 3 answers are empty: the model produced end-of-text right after the prompt" in n
               for n in notes), err
    assert out.count("──── sample") == 3
    # different samples, answers that are not empty: no note
    code, out, err = run(["sample", str(ar_run), "--prompt", "a", "--temperature", "0", "--num", "1"], capsys)
    assert code == 0 and "dlm: note" not in err and "──── sample 1 ────\nab\n" in out, (out, err)


# ---- a time budget that ends training says so ------------------------------------------------


@pytest.mark.slow
def test_a_time_budget_that_ends_training_says_so(ar_run, tmp_path, capsys):
    import re

    from dlm.checkpoint import read_run_config

    corpus = read_run_config(ar_run).data.data
    out = tmp_path / "budget"
    code, stdout, err = run(["train", "--family", "ar", "--data", corpus, "--out", str(out), "--steps", "1000000",
                             "--time-budget", "1", "--json", *TINY], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["time_budget_ended"] is True and summary["steps_asked"] == 1_000_000
    step = summary["step"]
    assert 0 < step < 1_000_000
    note = [line for line in err.splitlines() if line.startswith("dlm: note: ")]
    assert len(note) == 1, err
    assert f"training stopped at step {step:,} of 1,000,000 because its time budget of 1 s" in note[0]
    assert f"at loss {summary['loss']:.4f}" in note[0]
    command = re.search(r"`dlm (train [^`]*)`", note[0]).group(1).split()
    assert command == ["train", "--out", str(out), "--resume", "--time-budget", "0"]
    # the command it gives continues the run (two more steps here, not the million)
    code, stdout, err = run([*command, "--steps", str(step + 2), "--json", "--quiet"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["step"] == step + 2 and "dlm: note" not in err
    # a run that reaches its steps says nothing
    code, stdout, err = run(["train", "--family", "ar", "--data", corpus, "--out", str(tmp_path / "all"),
                             "--steps", "2", "--time-budget", "3600", "--json", *TINY], capsys)
    assert code == 0 and "time_budget_ended" not in json.loads(stdout) and "dlm: note" not in err


# ---- SFT: the end-of-text filling (data.sft_length) and what evaluation figures cover --------


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A tiny MDLM base and two fine-tunings of it on short answers, one per data.sft_length."""
    d = tmp_path_factory.mktemp("sft-filling")
    corpus = d / "text.txt"
    corpus.write_text("".join(f"To be, or not to be, that is the question {i}.\n" for i in range(300)))
    pairs = d / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"To be {i}, ", "response": "not" if i % 2 else "not to be."})
                             + "\n" for i in range(40)))
    base = d / "base"
    assert main(["train", "--family", "mdlm", "--data", str(corpus), "--out", str(base), "--steps", "3", *TINY]) == 0
    runs = {"base": base, "pairs": pairs}
    for mode in ("batch", "model"):
        runs[mode] = d / mode
        argv = ["train", "--init-from", str(base), "--data", str(pairs), "--out", str(runs[mode]), "--steps", "4",
                "--batch-size", "4", "--quiet", "data.val_fraction=0.2"]
        assert main(argv + ([] if mode == "batch" else ["data.sft_length=model"])) == 0
    return runs


def test_a_batch_is_cut_to_its_longest_row(sft):
    from dlm.data import BlockLoader, prepare_data
    from dlm.runs import load_run

    run = load_run(sft["batch"], "cpu")
    assert run.cfg.data.sft_length == "batch"  # the default, though the base predates nothing
    data = prepare_data(run.cfg.data, run.tokenizer)
    rows, clean = data.rows("train", run.cfg.data.seq_len)
    lengths = data.lengths("train")
    assert rows.shape[1] == 32 and set(lengths.tolist()) <= set(range(2, 33))
    loader = BlockLoader(rows, 4, seed=0, clean=clean, lengths=lengths)
    widths = []
    for _ in range(10):
        order = loader._epoch_order()[loader.position: loader.position + 4].tolist()
        batch = loader.next_batch()
        widths.append(batch.x0.shape[1])
        assert batch.x0.shape[1] == max(lengths[order])  # the longest row: prompt, response, one end-of-text
        assert (batch.x0.numpy() == rows[order][:, :batch.x0.shape[1]]).all()
        assert (batch.clean.numpy() == clean[order][:, :batch.x0.shape[1]]).all()
    assert min(widths) < 32 and len(set(widths)) > 1  # short rows are not filled to seq_len
    # a run trained with data.sft_length=model: every batch is the whole rows
    loader = BlockLoader(rows, 4, seed=0, clean=clean)
    assert loader.next_batch().x0.shape == (4, 32)


def test_old_run_folders_read_as_filled_to_the_model_length(sft, tmp_path, capsys):
    """A run folder from before data.sft_length has no such key: it trained with every row
    filled to seq_len, so it reads (and resumes, and evaluates) as "model"."""
    import shutil

    import yaml

    from dlm.checkpoint import read_run_config

    old = tmp_path / "old"
    shutil.copytree(sft["model"], old)
    config = yaml.safe_load((old / "config.yaml").read_text())
    assert config["data"].pop("sft_length") == "model"
    (old / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert read_run_config(old).data.sft_length == "model"
    code, _, err = run(["train", "--out", str(old), "--resume", "--steps", "5", "--quiet"], capsys)
    assert code == 0, err
    # a fine-tuning that starts from an old folder is a new run: the default, or what it asks
    assert main(["train", "--init-from", str(old), "--data", str(sft["pairs"]), "--out", str(tmp_path / "new"),
                 "--steps", "1", "--batch-size", "4", "--quiet"]) == 0
    assert read_run_config(tmp_path / "new").data.sft_length == "batch"


def test_sft_evaluation_says_what_its_figures_cover(sft, capsys):
    from dlm.data import prepare_data
    from dlm.runs import load_run

    code, out, err = run(["eval", str(sft["batch"]), "--json", "--mc-samples", "1"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["scored"] == "responses" and r["conditional"] is True
    loaded = load_run(sft["batch"], "cpu")
    data = prepare_data(loaded.cfg.data, loaded.tokenizer)
    rows, clean = data.rows("val", 32)
    assert r["tokens"] == int((data.lengths("val") - clean.sum(1)).sum())  # each response and its end-of-text
    response_bytes = sum(len(("not" if i % 2 else "not to be.").encode()) for i in range(40) if i % 5 == 4)
    assert r["bytes"] == response_bytes
    assert r["bits_per_byte"] == pytest.approx(r["nll"] * r["tokens"] / r["bytes"] / 0.6931471805599453)
    # a run that scores the filling: per token figures only, and the text output says why
    code, out, err = run(["eval", str(sft["model"]), "--json", "--mc-samples", "1"], capsys)
    r = json.loads(out)
    assert code == 0 and r["scored"] == "responses and their end-of-text filling" and r["bits_per_byte"] is None
    assert r["tokens"] == int((32 - clean.sum(1)).sum()) and r["nll"] > 0
    code, out, err = run(["eval", str(sft["model"]), "--mc-samples", "1"], capsys)
    assert code == 0 and "bits/byte      — (the scored end-of-text filling stands for no bytes" in out
    assert "scored: responses and their end-of-text filling" in out


@pytest.mark.parametrize("value,fragment", [("rows", "one of batch, model"), ("[1]", "must be a string")])
def test_sft_length_bad_values(sft, value, fragment, tmp_path, capsys):
    out = tmp_path / "bad"
    one_line_error(*run(["train", "--init-from", str(sft["base"]), "--data", str(sft["pairs"]), "--out", str(out),
                         "--steps", "1", f"data.sft_length={value}"], capsys)[::2], "data.sft_length", fragment)
    assert not out.exists()


def test_a_batch_run_answers_in_rows_as_long_as_it_trained_on(sft, capsys):
    """A data.sft_length=batch run never saw the positions after its longest training row: its
    answers are drawn in rows of that length (a model run's in rows of seq_len)."""
    from dlm.data import prepare_data
    from dlm.runs import load_run
    from dlm.service import answer_rows

    loaded = load_run(sft["batch"], "cpu")
    longest = int(prepare_data(loaded.cfg.data, loaded.tokenizer).lengths("train").max())
    assert longest < 32
    for mode, width in (("batch", longest), ("model", 32)):
        code, out, err = run(["sample", str(sft[mode]), "--prompt", "To be 3, ", "--num", "1", "--steps", "4",
                              "--json"], capsys)
        assert code == 0 and json.loads(out)["length"] == width, (mode, err)
        rows, clean = answer_rows(load_run(sft[mode], "cpu"), None, "val", 3)  # what dlm eval --answers answers
        assert rows.shape == clean.shape == (3, width)
    code, out, err = run(["sample", str(sft["batch"]), "--prompt", "To be 3, ", "--length", "32", "--num", "1",
                          "--steps", "4", "--json"], capsys)
    assert code == 0 and json.loads(out)["length"] == 32  # --length still decides
