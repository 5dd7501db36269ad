import pytest

from dlm.config import build_config, from_dict, parse_override
from dlm.errors import DlmError


def test_defaults_yaml_overrides_and_flags_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("family: ar\ntrain:\n  lr: 0.01\n  steps: 7\n")
    cfg = build_config(str(f), ["train.lr=3e-4", "model.n_layer=3"], {"train.steps": 9})
    assert cfg.family == "ar" and cfg.train.lr == 3e-4 and cfg.model.n_layer == 3 and cfg.train.steps == 9


def test_shipped_config_by_name():
    cfg = build_config("quickstart", [], {})
    assert cfg.family == "mdlm" and cfg.data.data == "shakespeare" and cfg.train.steps == 1800


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("nope=1", "unknown config key 'nope'"),
        ("train.steps=many", "must be an integer"),
        ("train.lr=fast", "must be a number"),
        ("train=3", "must be a mapping"),
        ("lr", "key=value"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(DlmError, match=message):
        build_config(None, [override], {})


def test_unknown_config_file():
    with pytest.raises(DlmError, match="neither a file nor a shipped config"):
        build_config("does-not-exist", [], {})


def test_roundtrip_through_dict():
    cfg = build_config("quickstart", ["train.seed=5"], {})
    assert from_dict(cfg.to_dict()) == cfg


def test_parse_override_types():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=hello world") == ("a", "hello world")
