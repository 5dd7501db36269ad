"""Every config key, every kind of bad value, through the real command line.

The keys are enumerated from the dataclasses in ``dlm.config`` and from the ``Settings``
of every objective and sampler of every family, so a key added tomorrow is fuzzed
without anyone remembering to. A value is bad when its type is wrong, when it is a
non-finite float, or when it lies outside the ``range`` / ``choices`` its field declares;
each must end in one line ``dlm: error: …`` naming the key, exit status 2, no run folder,
and before any data is read or any model is built (the guards below make that a failure,
not a slowness).
"""

import dataclasses
import shutil
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from dlm.cli import _train_flags
from dlm.config import ComponentConfig, RunConfig
from dlm.families import FAMILIES
from helpers import TINY, one_line_error, run

# Numeric keys that genuinely accept any finite value: key → why. Every other numeric key
# must declare a range (``setting(default, lo=…, hi=…)``); test_every_numeric_key_has_a_range
# fails until it does.
UNRANGED = {}

# String keys with no fixed set of values: key → where their value is checked instead.
FREE_STRINGS = {
    "data.data": "a path or corpus name: checked when the data is read",
    "train.init_from": "a run folder, set by --init-from: checked when that run is opened",
}


@dataclass(frozen=True)
class Key:
    path: str  # the dotted key, e.g. "train.lr" or "objective.reg_eps"
    tp: type  # its type, None removed from an Optional
    field: dataclasses.Field | None  # None for a component's ``name``
    context: tuple[str, ...] = ()  # overrides that select its family and component

    @property
    def id(self) -> str:
        return " ".join([*self.context, self.path])


def _walk(cls, prefix: str, context: tuple[str, ...]) -> list[Key]:
    """The leaf keys of dataclass ``cls`` (nested dataclasses recursed into)."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if tp is ComponentConfig:
            continue  # enumerated per family and component in leaf_keys
        if dataclasses.is_dataclass(tp):
            keys += _walk(tp, f"{prefix}{f.name}.", context)
        else:
            keys.append(Key(prefix + f.name, tp, f, context))
    return keys


def leaf_keys() -> list[Key]:
    """Every key a config can set: RunConfig's own, and per family the ``name`` and the
    ``Settings`` fields of each of its objectives, samplers and (where it has a choice)
    processes."""
    keys = _walk(RunConfig, "", ())
    for family in FAMILIES.names():
        cls = FAMILIES.get(family)
        sections = [("objective", cls.objectives), ("sampler", cls.samplers)]
        if cls.processes is not None:  # families that offer several forward processes
            sections.append(("process", cls.processes))
        for section, registry in sections:
            keys.append(Key(f"{section}.name", str, None, (f"family={family}",)))
            for name in registry.names():
                context = (f"family={family}", f"{section}.name={name}")
                keys += _walk(registry.get(name).Settings, section + ".", context)
    return keys


KEYS = leaf_keys()
NUMERIC = [k for k in KEYS if k.tp in (int, float)]


def _outside(rule) -> list:
    """Values just outside and far outside a Range: negative, zero, its ends and one past them."""
    ends = [e for e in (rule.lo, rule.hi) if e is not None]
    candidates = {-1, 0, *ends, *(e - 1 for e in ends), *(e + 1 for e in ends)}
    return sorted(v for v in candidates if not rule.ok(v))


def bad_values(key: Key) -> list[str]:
    """Bad values of ``key`` as they are typed after ``KEY=`` (parsed as YAML)."""
    if key.tp is bool:
        return ["abc", "[1, 2]", "2"]
    if key.tp is str:
        return ["[1, 2]", "{a: 1}", *([] if key.path in FREE_STRINGS else ["no-such-value"])]
    values = ["abc", "[1, 2]", ".nan", ".inf", "-.inf"] + (["1.5"] if key.tp is int else [])
    rule = key.field.metadata.get("range")
    return values + ([repr(key.tp(v)) for v in _outside(rule)] if rule else [])


def _names(line: str, key: Key, value: str) -> bool:
    """The message names the key: its dotted path, or (a registry's ``unknown family 'x'``)
    its last part — the section for a ``name`` — and the value."""
    word = key.path.split(".")[-2 if key.path.endswith(".name") else -1]
    return key.path in line or (word in line and value in line)


class _FlagNames:
    """Stands in for parsed arguments: each attribute is its flag, ``time_budget`` → ``--time-budget``."""

    def __getattr__(self, dest):
        return "--" + dest.replace("_", "-")


FLAG_OF = _train_flags(_FlagNames())  # config key → the train flag that sets it


def _train_argv(corpus: Path, out: Path, key: str | None = None) -> list[str]:
    """``dlm train`` of a tiny run, without the flag that would set ``key`` (flags win over KEY=VALUE)."""
    argv = ["--data", str(corpus), "--out", str(out), "--steps", "1", *TINY]
    if FLAG_OF.get(key) in argv:
        at = argv.index(FLAG_OF[key])
        del argv[at:at + 2]  # the flag and its value
    return ["train", *argv]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    f = tmp_path_factory.mktemp("corpus") / "text.txt"
    f.write_text("".join(f"To be, or not to be, that is the question {i}.\n" for i in range(400)))
    return f


@pytest.fixture
def no_work(monkeypatch):
    """A config error must stop before any data is read or any model is built."""
    import dlm.data
    from dlm.families.base import Family

    def reached(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"a bad config value reached {what}: it must be refused before")
        return fail

    monkeypatch.setattr(dlm.data, "load_corpus", reached("the data"))
    monkeypatch.setattr(dlm.data, "load_pairs", reached("the data"))
    monkeypatch.setattr(Family, "build_model", reached("model building"))


def test_the_enumeration_reaches_components_and_nested_sections():
    paths = {k.path for k in KEYS}
    assert {"train.lr", "model.dropout", "data.seq_len", "eval.mc_samples", "time_conditioning",
            "objective.name", "objective.reg_eps", "objective.where", "sampler.top_p", "sampler.cache",
            "process.name", "process.steps", "objective.ce_weight", "eval.time_stride"} <= paths
    assert {k.context[0] for k in KEYS if k.context} == {f"family={f}" for f in FAMILIES.names()}
    # bad_values knows these types; a key of another type needs its own bad values here
    assert {k.tp for k in KEYS} <= {bool, int, float, str}, {k.path: k.tp for k in KEYS}


def test_every_numeric_key_has_a_range():
    unranged = sorted({k.path for k in NUMERIC if "range" not in k.field.metadata} - set(UNRANGED))
    assert unranged == [], (f"numeric config keys without a declared range: {unranged}; declare one with "
                            "setting(default, lo=…, hi=…), or list the key in UNRANGED with the reason")


@pytest.mark.parametrize("key", KEYS, ids=lambda k: k.id)
def test_every_bad_value_of_every_key_is_one_line(key, corpus, tmp_path, capsys, no_work):
    out = tmp_path / "r"
    for value in bad_values(key):
        code, _, err = run([*_train_argv(corpus, out, key.path), *key.context, f"{key.path}={value}"], capsys)
        one_line_error(code, err)
        assert _names(err, key, value), f"{key.path}={value}: {err}"
        assert not out.exists(), f"{key.path}={value} left {out}"


@pytest.mark.parametrize("yaml_text,fragment", [
    ("train:\n  lr: .nan\n", "train.lr"),
    ("model:\n  dropout: 1.0\n", "model.dropout"),
    ("data:\n  seq_len: [1, 2]\n", "data.seq_len"),
    ("family: usdm\nobjective: {name: sddlm-v1, reg_eps: 0}\n", "objective.reg_eps"),
    ("sampler:\n  top_p: -.inf\n", "sampler.top_p"),
    ("schedule: no-such-schedule\n", "schedule"),
])
def test_bad_values_in_a_config_file(yaml_text, fragment, corpus, tmp_path, capsys, no_work):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    out = tmp_path / "r"
    one_line_error(*run([*_train_argv(corpus, out), "--config", str(config)], capsys)[::2], fragment)
    assert not out.exists()


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    from dlm.cli import main

    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(_train_argv(corpus, out)) == 0
    return out


@pytest.mark.parametrize("override,fragment", [
    ("train.steps=-1", "train.steps"),
    ("train.steps=.inf", "train.steps"),
    ("train.time_budget_s=.nan", "train.time_budget_s"),
    ("train.lr=abc", "train.lr"),
    ("sampler.temperature=-1", "sampler.temperature"),
])
def test_bad_values_on_resume_leave_the_run_as_it_was(override, fragment, trained, tmp_path, capsys):
    run_dir = shutil.copytree(trained, tmp_path / "run")
    before = sorted((p.relative_to(run_dir), p.read_bytes()) for p in run_dir.rglob("*") if p.is_file())
    one_line_error(*run(["train", "--out", str(run_dir), "--resume", override], capsys)[::2], fragment)
    assert sorted((p.relative_to(run_dir), p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()) == before


@pytest.mark.parametrize("yaml_text,key,lines", [
    ("train:\n  lr: 0.001\n  steps: 3\n  lr: 0.1\n", "train.lr", "lines 2 and 4"),
    ("family: mdlm\nschedule: cosine\nfamily: ar\n", "family", "lines 1 and 3"),
    ("family: usdm\nobjective: {name: sddlm-v1, reg_weight: 0.1, reg_weight: 0.2}\n", "objective.reg_weight",
     "lines 2 and 2"),
])
def test_duplicate_keys_in_a_config_file_are_refused(yaml_text, key, lines, corpus, tmp_path, capsys, no_work):
    config = tmp_path / "dup.yaml"
    config.write_text(yaml_text)
    out = tmp_path / "r"
    one_line_error(*run([*_train_argv(corpus, out), "--config", str(config)], capsys)[::2],
                   f"config {config} has a duplicate key '{key}' ({lines})")
    assert not out.exists()


def test_a_key_repeated_through_a_merge_or_in_other_sections_is_no_duplicate(tmp_path):
    from dlm.config import load_yaml

    config = tmp_path / "ok.yaml"
    config.write_text("base: &b {batch_size: 4, lr: 0.01}\ntrain: {<<: *b, lr: 0.1}\neval: {<<: *b}\n")
    assert load_yaml(config)["train"] == {"batch_size": 4, "lr": 0.1}
