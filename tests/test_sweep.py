"""A bad-input sweep over the whole command line whose bad values are generated, not listed:
from the settings declarations (every field of every run-config section and of every
registered process', objective's and sampler's ``Settings``: just outside its declared range,
the wrong type, NaN and ±∞, a name that is not a choice), from the registries (every family
with the objectives and samplers of the processes it does not serve) and from the parsers
(every flag of every sub-command with a value of the wrong type, NaN/∞ for numbers, −1 for
counts). A new flag, setting or component is swept without anyone listing it.

Every case runs through the real CLI entry (``dlm.cli.main``, in-process) and must end with
exit 2, exactly one stderr line ``dlm: error: …`` that names what was wrong, no traceback, and
no folder left behind; a few run again in a real subprocess.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from dlm.cli import build_parser, main
from dlm.families import FAMILIES
from dlm.objectives import OBJECTIVES
from dlm.samplers import SAMPLERS
from dlm.schema import RunConfig
from dlm.settings import ComponentConfig

TINY = ["--size", "tiny", "--seq-len", "16", "--batch-size", "2", "--tokenizer", "char", "--seed", "0", "--quiet",
        "--steps", "1"]
# the same as key=value overrides, which a later (bad) override replaces (a flag would win over it)
TINY_KEYS = ["model.size=tiny", "data.seq_len=16", "train.batch_size=2", "data.tokenizer=char", "train.seed=0",
             "train.steps=1", "--quiet"]


# ---- bad values from a declaration ----------------------------------------------------------


def _base_type(tp):
    """int for ``int | None``, and so on."""
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType")):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return tp


def bad_values(f: dataclasses.Field, tp) -> list[str]:
    """``key=value`` texts (YAML scalars) a setting declared as ``f`` of type ``tp`` must refuse."""
    tp = _base_type(tp)
    rule, choices = f.metadata.get("range"), f.metadata.get("choices")
    out = []
    if tp in (int, float):
        out.append("abc")
        if tp is int:
            out.append("1.5")
        else:
            out += ["nan", "inf", "-inf"]
        if rule is not None:
            step = 1 if tp is int else None
            if rule.lo is not None:
                out.append(repr(rule.lo if rule.lo_open else rule.lo - (step or max(abs(rule.lo), 1) * 1e-6)))
            if rule.hi is not None:
                out.append(repr(rule.hi if rule.hi_open else rule.hi + (step or max(abs(rule.hi), 1) * 1e-6)))
    elif tp is bool:
        out += ["maybe", "2"]
    elif tp is str and choices:
        out += ["bogus-choice", "[1]"]
    return out


def _fields(cls):
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def config_cases():
    """(id, overrides) for every field of every section of the run config."""
    cfg = RunConfig()
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(value) or isinstance(value, ComponentConfig):
            continue
        for f, tp in _fields(type(value)):
            for bad in bad_values(f, tp):
                yield f"{section.name}.{f.name}={bad}", [f"{section.name}.{f.name}={bad}"]


def _processes(family) -> dict[str, str]:
    """A family's process choices (the ``process:`` name → PROCESSES key); '' for a fixed one."""
    return dict(family.process_choices) if family.processes is not None else {"": family.process_key()}


def component_cases():
    """(id, argv tail) for every setting of every component each family offers, and every
    component a family does not offer."""
    from dlm.processes import PROCESSES

    for name in FAMILIES.names():
        family = FAMILIES.get(name)
        for choice, process in _processes(family).items():
            head = ["--family", name] + ([f"process={choice}"] if choice else [])
            for f, tp in _fields(PROCESSES.get(process).Settings) if process in PROCESSES else []:
                for bad in bad_values(f, tp):
                    yield f"{name}-{choice}-process.{f.name}={bad}", head + [f"process.{f.name}={bad}"]
            for kind, registry in (("objective", OBJECTIVES), ("sampler", SAMPLERS)):
                for comp in registry.names(process):
                    for f, tp in _fields(registry.get(comp, process).Settings):
                        for bad in bad_values(f, tp):
                            yield (f"{name}-{choice}-{kind}.{comp}.{f.name}={bad}",
                                   head + [f"{kind}.name={comp}", f"{kind}.{f.name}={bad}"])
                    yield f"{name}-{choice}-{kind}.{comp}.bogus_key", head + [f"{kind}.name={comp}", f"{kind}.bogus_key=1"]
                for comp in sorted(set(registry.names()) - set(registry.names(process))) + ["bogus-name"]:
                    yield f"{name}-{choice}-{kind}={comp}", head + [f"{kind}.name={comp}"]
        if family.processes is not None:
            yield f"{name}-process=bogus", ["--family", name, "process=bogus-process"]
        elif family.process_choices:
            yield f"{name}-process=other", ["--family", name, "process=bogus-process"]


def _expected_names(argv_tail: list[str]) -> list[str]:
    """What the error line may name: the bad key (its last override), or the component."""
    if "=" not in argv_tail[-1]:
        return [argv_tail[-1]]
    key, value = argv_tail[-1].split("=", 1)
    return [key, key.rsplit(".", 1)[-1], value]


# ---- running a case -------------------------------------------------------------------------


def check_refused(argv, capsys, folder: Path, names: list[str]):
    """``dlm ARGV`` refused the way bad input must be; returns a failure text or None."""
    before = set(folder.iterdir())
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own exit would print a usage block
        code = f"SystemExit({e.code})"
    except BaseException as e:  # noqa: BLE001 - a traceback is the defect being swept for
        capsys.readouterr()
        return f"traceback {type(e).__name__}: {e}"
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("dlm: note:")]
    left = set(folder.iterdir()) - before
    for path in left:  # the next case starts clean
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if code != 2:
        return f"exit {code} (silently accepted?) {err.strip()[-300:]!r}"
    if len(lines) != 1 or not lines[0].startswith("dlm: error: "):
        return f"not one line: {err[-400:]!r}"
    if left:
        return f"left behind: {sorted(p.name for p in left)}"
    if names and not any(n in lines[0] for n in names):
        return f"the error does not name {names[0]!r}: {lines[0]!r}"
    return None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    f = tmp_path_factory.mktemp("sweep-corpus") / "text.txt"
    f.write_text("".join(f"To be, or not to be, that is the question {i}.\n" for i in range(200)))
    return f


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """A one-step run of every family (what eval, sample and lm-eval are swept against)."""
    out = {}
    for name in FAMILIES.names():
        d = tmp_path_factory.mktemp(f"sweep-{name}") / "run"
        assert main(["train", "--family", name, "--data", str(corpus), "--out", str(d), *TINY]) == 0, name
        out[name] = d
    return out


def _sweep(cases, argv_of, capsys, folder):
    failures = [f"{case}: {why}" for case, tail in cases
                if (why := check_refused(argv_of(tail), capsys, folder, _expected_names(tail)))]
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)


@pytest.mark.parametrize("cases", [config_cases, component_cases], ids=["run-config", "components"])
def test_every_setting_refuses_bad_values(cases, corpus, tmp_path, capsys, monkeypatch):
    """``dlm train … KEY=bad`` for every run-config setting, and for every setting of every
    process, objective and sampler each family offers (and the components it does not)."""
    monkeypatch.chdir(tmp_path)
    cases = list(cases())
    assert len(cases) > 100
    out = tmp_path / "out"
    _sweep(cases, lambda tail: ["train", "--data", str(corpus), "--out", str(out), *TINY_KEYS, *tail], capsys, tmp_path)


def sampler_cases(family_name: str):
    """(id, tail) for ``dlm sample RUN --sampler S sampler.KEY=bad`` over every sampler of a family
    (the wrong type and the range's edges: NaN, ∞ and non-integers are swept through train above)."""
    family = FAMILIES.get(family_name)
    process = family.process_key()
    for comp in SAMPLERS.names(process):
        for f, tp in _fields(SAMPLERS.get(comp, process).Settings):
            for bad in (v for v in bad_values(f, tp) if v not in ("1.5", "nan", "inf", "-inf")):
                yield f"{comp}.{f.name}={bad}", ["--sampler", comp, f"sampler.{f.name}={bad}"]
    for comp in sorted(set(SAMPLERS.names()) - set(SAMPLERS.names(process))):
        yield f"--sampler {comp}", ["--sampler", comp]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES.names())
def test_every_sampler_setting_refuses_bad_values_on_a_run(family, runs, tmp_path, capsys, monkeypatch):
    """``dlm sample RUN --sampler S sampler.KEY=bad``: switching samplers on a run trained with
    its family's default must refuse each bad value with its own message."""
    monkeypatch.chdir(tmp_path)
    cases = list(sampler_cases(family))
    _sweep(cases, lambda tail: ["sample", str(runs[family]), "--num", "1", "sampler.steps=2", *tail], capsys, tmp_path)


# ---- every flag of every sub-command --------------------------------------------------------


def _commands(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield from _commands(sub, (*prefix, name))
                else:
                    yield (*prefix, name), sub


def _flag_values(action) -> list[str]:
    if action.choices is not None:
        return ["bogus-choice"]
    if action.type is int:
        return ["abc", "1.5", "-1"]
    if action.type is float:
        return ["abc", "nan", "inf", "-1"]
    return []


# flags whose −1 is a valid value, with the reason (none yet: a count or a size is never negative)
NEGATIVE_OK: dict[str, str] = {}


def flag_cases():
    for command, sub in _commands(build_parser()):
        for action in sub._actions:
            if not action.option_strings or action.nargs == 0:
                continue
            flag = max(action.option_strings, key=len)
            for value in _flag_values(action):
                if value == "-1" and flag in NEGATIVE_OK:
                    continue
                yield " ".join(command), flag, value, action.dest


def _base_argv(command: str, runs, corpus, out: Path) -> list[str]:
    """A valid command of the sub-command, cheap to reach its checks (bad values go after it)."""
    run = str(runs["mdlm"])
    return {
        "train": ["train", "--data", str(corpus), "--out", str(out), *TINY],
        "eval": ["eval", run, "--mc-samples", "1", "--max-tokens", "32"],
        "sample": ["sample", run, "--num", "1", "--steps", "2"],
        "quickstart": ["quickstart", "--out", str(out), "--steps", "1", "--quiet", "data.tokenizer=char",
                       "data.seq_len=16", "train.batch_size=2", "eval.max_tokens=32"],
        "lm-eval": ["lm-eval", run, "--tasks", "no-such-task-anywhere"],
        "bench compare": ["bench", "compare", "--out", str(out), "--models", "ar", "--seeds", "1", "train.steps=1",
                          "compare.judge=/nonexistent/judge"],
        "distill": ["distill", run, "--out", str(out)],
    }[command].copy()


@pytest.mark.slow
def test_every_flag_refuses_a_value_of_the_wrong_kind(runs, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = list(flag_cases())
    assert len(cases) > 80
    out = tmp_path / "out"
    failures = []
    for command, flag, value, dest in cases:
        argv = _base_argv(command, runs, corpus, out)
        if flag in argv:  # the base's own value replaced
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
        names = [flag, dest, dest.replace("_", "-")]
        if (why := check_refused(argv, capsys, tmp_path, names)):
            failures.append(f"dlm {command} {flag} {value}: {why}")
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)


# ---- a few in a real process ----------------------------------------------------------------


@pytest.mark.parametrize("argv,fragment", [
    (["eval", "{run}", "--mc-samples", "abc"], "invalid int value: 'abc'"),
    (["sample", "{run}", "--temperature", "nan"], "--temperature"),
    (["train", "--out", "{out}", "--data", "{corpus}", "train.lr=inf"], "train.lr"),
    (["sample", "{run}", "--sampler", "remdm", "sampler.eta=-1"], "sampler.eta"),
])
def test_in_a_real_process(argv, fragment, runs, corpus, tmp_path):
    out = tmp_path / "out"
    argv = [a.format(run=runs["mdlm"], out=out, corpus=corpus) for a in argv]
    p = subprocess.run([sys.executable, "-m", "dlm", *argv], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("dlm: error: "), p.stderr
    assert fragment in lines[0] and "Traceback" not in p.stderr and not out.exists() and p.stdout == ""
