"""Run folders written by dlm-run/1 (before the objective and sampler had their own config
sections) still load for eval, sample and --resume. The folders in tests/data/runs-v1 were
written by the previous release (commit b71ae9d) with:

    dlm train --family {mdlm,usdm,ar} --objective {nelbo,sddlm-v1,ce} --data text.txt --tokenizer char
              --seq-len 16 --batch-size 4 --steps 3 --out run-F model.n_layer=1 model.n_head=2
              model.d_model=32 model.cond_dim=16 train.keep_checkpoints=1 sddlm.reg_weight=0.2 sample.steps=8
"""

import json
import shutil
from pathlib import Path

import pytest

from dlm.checkpoint import read_run_config
from helpers import run

OLD = Path(__file__).parent / "data" / "runs-v1"


@pytest.fixture
def old_runs(tmp_path, monkeypatch):
    shutil.copytree(OLD, tmp_path / "old")
    monkeypatch.chdir(tmp_path / "old")  # the runs name their data as text.txt, relative
    return tmp_path / "old"


def test_an_old_config_is_read_into_the_new_layout(old_runs):
    assert json.loads((old_runs / "run-usdm" / "dlm-run.json").read_text())["format"] == "dlm-run/1"
    cfg = read_run_config(old_runs / "run-usdm")
    assert cfg.objective.name == "sddlm-v1"
    assert cfg.objective.settings == {"where": "changed", "reg_weight": 0.2, "reg_eps": 1e-4, "negatives": 1}
    assert cfg.sampler.name == "ancestral" and cfg.sampler.settings["steps"] == 8
    mdlm = read_run_config(old_runs / "run-mdlm")
    assert mdlm.objective.name == "nelbo" and mdlm.objective.settings == {}  # the old sddlm defaults dropped


@pytest.mark.parametrize("family", ["mdlm", "usdm", "ar"])
def test_old_runs_evaluate_sample_and_resume(old_runs, family, capsys):
    out = old_runs / f"run-{family}"
    code, stdout, err = run(["eval", str(out), "--json", "--mc-samples", "1"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["step"] == 3
    code, stdout, err = run(["sample", str(out), "--num", "2", "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["steps"] == (8 if family != "ar" else 16)  # the old sample.steps
    code, _, err = run(["train", "--out", str(out), "--resume", "--steps", "5", "--quiet"], capsys)
    assert code == 0, err
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000005"


def test_a_text_run_from_before_sft_length_reads_as_the_default(tmp_path, capsys):
    """data.sft_length has no effect on text blocks: a text run folder without the key reads as
    the default, so a comparison (or anything that plans the default) finds nothing changed;
    a folder whose data is unknown or prompt/response rows reads as 'model' (test_first_use)."""
    import yaml

    corpus = tmp_path / "text.txt"
    corpus.write_text("".join(f"To be, or not to be, that is the question {i}.\n" for i in range(200)))
    out = tmp_path / "run"
    code, _, err = run(["train", "--family", "mdlm", "--data", str(corpus), "--out", str(out), "--steps", "1",
                        "--size", "tiny", "--seq-len", "32", "--batch-size", "2", "--tokenizer", "char", "--quiet"],
                       capsys)
    assert code == 0, err
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["data"].pop("sft_length")
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert read_run_config(out).data.sft_length == "batch"
    config["data"]["data"] = str(tmp_path / "gone.jsonl")  # data that may have been pairs: assume it mattered
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert read_run_config(out).data.sft_length == "model"
