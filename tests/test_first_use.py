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
