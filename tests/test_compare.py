"""`dlm bench compare` end to end through the real CLI: report, results and plots written;
a rerun retrains nothing finished, continues what was cut short and measures only what is
missing; data-constrained mode; bad input as one line before any training."""

import json
import sys

import pytest
import yaml

pytest.importorskip("transformers")

from dlm.data import prepare_data  # noqa: E402
from dlm.config import DataConfig  # noqa: E402
from dlm.errors import DlmError  # noqa: E402
from dlm.bench.report import _one_line  # noqa: E402
from helpers import one_line_error, tiny_judge  # noqa: E402
from helpers import run as run_cli  # noqa: E402

PNGS = ("training_loss.png", "gen_ppl_vs_time.png", "bits_per_token.png")


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A tiny random judge: fast to load (its Gen PPL means nothing, its plumbing is real)."""
    return tiny_judge(tmp_path_factory.mktemp("judge"))


def write_config(path, judge_dir, **compare):
    """A two-model comparison small enough to train and measure in seconds."""
    section = {
        "seeds": 1,
        "models": {"ar": {"family": "ar"}, "mdlm": {"family": "mdlm"}},
        "sample_steps": [4, 8],
        "samples": 4,
        "judge": str(judge_dir),
        "infill_lengths": [1, 4],
        "infill_rows": 4,
        "speed_steps": [8],
        "speed_batches": [1, 2],
        "speed_repeats": 1,
        **compare,
    }
    run = {"model": {"size": "tiny"}, "data": {"data": "shakespeare", "tokenizer": "char", "seq_len": 32},
           "train": {"steps": 4, "batch_size": 4, "log_every": 2, "warmup_steps": 1},
           "eval": {"mc_samples": 1, "max_tokens": 256, "batch_size": 8}}
    path.write_text(yaml.safe_dump({"compare": section, "run": run}))
    return path


def ckpt_files(run_dir):
    return {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*") if p.is_file()}


def test_compare_end_to_end_and_resume(tmp_path, judge_dir, capsys):
    cfg = write_config(tmp_path / "c.yaml", judge_dir)
    out = tmp_path / "cmp"
    argv = ["bench", "compare", "--config", str(cfg), "--out", str(out), "--quiet"]
    # first pass: training cut short at 2 of 4 steps (train.steps may grow, as with dlm train --resume)
    code, _, err = run_cli([*argv, "train.steps=2"], capsys)
    assert code == 0, err
    assert "[1/2] ar-s0: training" in err and "[2/2] mdlm-s0" in err
    assert json.loads((out / "evals" / "ar-s0.json").read_text())["step"] == 2

    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "ar-s0: continuing" in err and "mdlm-s0: continuing" in err
    for name in ("report.md", "results.json", *PNGS):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"ar", "mdlm"}
    ar, mdlm = results["models"]["ar"], results["models"]["mdlm"]
    assert ar["bound"] is False and mdlm["bound"] is True
    for model in (ar, mdlm):
        fig = model["figures"][next(iter(model["figures"]))]
        assert fig["train_steps"] == 4
        for key in ("bits_per_token", "nll", "ppl", "bits_per_byte", "stderr_bits_per_token", "train_tokens_per_s",
                    "infill_accuracy@1", "infill_accuracy@4"):
            assert key in fig, key
        assert model["aggregate"]["bits_per_token"]["n"] == 1
    # AR's steps do not follow the diffusion budget: measured once; MDLM at both budgets
    assert [k for k in ar["figures"]["ar-s0"] if k.startswith("gen_ppl@")] == ["gen_ppl@4"]
    assert {"gen_ppl@4", "gen_ppl@8", "batches_per_s_b2@8", "seconds_per_batch_b1@8"} <= set(mdlm["figures"]["mdlm-s0"])
    assert ar["infill_context"] == "left only" and mdlm["infill_context"] == "both sides"
    report = (out / "report.md").read_text()
    assert "| ar | ar | exact |" in report and "| mdlm | mdlm | bound |" in report
    assert "bench compare --config" in report and "torch" in report
    # read alone, the report says what its figures are worth (issue 19, item 14)
    base = results["baselines"]
    assert base["tokens"] == ar["runs"]["ar-s0"]["likelihood"]["tokens"]  # the same validation tokens
    assert base["unigram_bits_per_byte"] == pytest.approx(ar["runs"]["ar-s0"]["likelihood"]["unigram_bits_per_byte"])
    assert f"| *token unigram (floor)* | — | exact | {base['unigram_bits_per_token']:.3f} |" in report
    assert f"| *most frequent token ({base['most_frequent']!r})* | none | {base['infill']['1']:.3f} |" in report
    assert "One seed: no spread." in report and "| ar | —" not in report
    assert f"`{out}/runs/`" in report
    sample = mdlm["runs"]["mdlm-s0"]["gen@8"]["examples"]
    assert len(sample) == 3 and f"  - `{_one_line(sample[0])[:120]}`" in report
    draws = [v for k, v in mdlm["runs"]["mdlm-s0"]["speed@8"].items() if k.startswith("draws_b")]
    assert all(d >= 1 for d in draws) and "timed draw" in report
    # the two runs are normal run folders
    code, out_text, err = run_cli(["eval", str(out / "runs" / "mdlm-s0"), "--json", "--max-tokens", "64"], capsys)
    assert code == 0 and json.loads(out_text)["step"] == 4

    # interrupted mid-evaluation: mdlm's cache lost one part, the report is gone
    before = {name: ckpt_files(out / "runs" / name) for name in ("ar-s0", "mdlm-s0")}
    ar_cache = (out / "evals" / "ar-s0.json").read_text()
    cache = json.loads((out / "evals" / "mdlm-s0.json").read_text())
    kept_speed = cache["parts"]["speed@8"]
    del cache["parts"]["infill@4"]
    (out / "evals" / "mdlm-s0.json").write_text(json.dumps(cache))
    (out / "report.md").unlink()
    for name in PNGS:
        (out / name).unlink()
    code, _, err = run_cli([*argv, "compare.plots=false"], capsys)  # report and JSON only
    assert code == 0, err
    assert not any((out / name).exists() for name in PNGS) and ".png" not in (out / "report.md").read_text()
    assert "training" not in err and "continuing" not in err  # nothing retrained
    assert "mdlm-s0: masked-token completion, spans of 4" in err and "likelihood" not in err  # only the missing part
    assert {name: ckpt_files(out / "runs" / name) for name in before} == before
    assert (out / "evals" / "ar-s0.json").read_text() == ar_cache
    again = json.loads((out / "evals" / "mdlm-s0.json").read_text())["parts"]
    assert again["speed@8"] == kept_speed and "infill@4" in again
    assert "| mdlm | mdlm | bound |" in (out / "report.md").read_text()
    # the same folder with other settings: refused before anything is trained or written
    mark = (out / "compare.json").read_text()
    code, _, err = run_cli([*argv, "train.lr=0.01"], capsys)
    one_line_error(code, err, "was trained with train.lr=")
    assert (out / "compare.json").read_text() == mark


def test_data_constrained_mode(tmp_path, judge_dir, capsys):
    cfg = write_config(tmp_path / "c.yaml", judge_dir, sample_steps=[4], speed_steps=[4], infill_lengths=[1])
    out = tmp_path / "dc"
    # 512 unique tokens = 16 sequences of 32 = 4 batches of 4 per epoch; 4 epochs → 16 steps, marks at 1, 2, 4
    code, _, err = run_cli(["bench", "compare", "--config", str(cfg), "--out", str(out), "--quiet",
                            "--unique-tokens", "512", "--epochs", "4"], capsys)
    assert code == 0, err
    assert (out / "data_constrained.png").is_file()
    results = json.loads((out / "results.json").read_text())
    dc = results["data_constrained"]
    assert dc["epoch_marks"] == [1.0, 2.0, 4.0] and dc["mark_steps"] == {"1": 4, "2": 8, "4": 16}
    for name in ("ar", "mdlm"):
        fig = results["models"][name]["figures"][f"{name}-s0"]
        assert fig["train_steps"] == 16
        assert all(f"bits_per_token@epoch{e}" in fig for e in ("1", "2", "4"))
        # the mark at the end is the final weights: the same figure as the run's own likelihood
        assert fig["bits_per_token@epoch4"] == pytest.approx(fig["bits_per_token"])
        kept = sorted(p.name for p in (out / "runs" / f"{name}-s0" / "checkpoints").glob("step_*"))
        assert kept == ["step_00000004", "step_00000008", "step_00000016"]  # other epochs pruned
    assert len(dc["crossings"]) == 1 and dc["crossings"][0]["reference"] == "ar"
    assert "## Data-constrained training" in (out / "report.md").read_text()


@pytest.mark.parametrize("extra, fragment", [
    (["--models", "ar,nope"], "unknown model 'nope'"),
    (["--seeds", "two"], "--seeds must be a count"),
    (["--seeds", "0"], "number of seeds must be ≥ 1"),
    (["--seeds", "1,1"], "distinct"),
    (["train.nope=1"], "unknown config key 'train.nope'"),
    (["compare.nope=1"], "unknown config key 'compare.nope'"),
    (["compare.samples=0"], "compare.samples"),
    (["compare.sample_steps=[0]"], "compare.sample_steps"),
    (["--unique-tokens", "100"], "needs both --unique-tokens"),
    (["--unique-tokens", "10000000", "--epochs", "2"], "has only"),
])
def test_bad_input_is_one_line_before_training(tmp_path, judge_dir, capsys, extra, fragment):
    cfg = write_config(tmp_path / "c.yaml", judge_dir)
    out = tmp_path / "cmp"
    code, _, err = run_cli(["bench", "compare", "--config", str(cfg), "--out", str(out), *extra], capsys)
    one_line_error(code, err, fragment)
    assert not (out / "runs").exists()


def test_missing_matplotlib_is_one_line_before_training(tmp_path, judge_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets where it is not installed
    cfg = write_config(tmp_path / "c.yaml", judge_dir)
    out = tmp_path / "cmp"
    code, _, err = run_cli(["bench", "compare", "--config", str(cfg), "--out", str(out)], capsys)
    one_line_error(code, err, "pip install 'dlm[bench]', or pass compare.plots=false")
    assert not out.exists()
    code, _, err = run_cli(["bench", "compare", "--config", str(cfg), "--out", str(out), "compare.plots=maybe"], capsys)
    one_line_error(code, err, "compare.plots")


def test_bad_config_and_out_folders(tmp_path, judge_dir, capsys):
    cfg = write_config(tmp_path / "c.yaml", judge_dir)
    code, _, err = run_cli(["bench", "compare", "--config", "quickstart", "--out", str(tmp_path / "a")], capsys)
    one_line_error(code, err, "is not a compare config")
    (tmp_path / "shape.yaml").write_text("compare:\n  models: [ar, mdlm]\n")
    code, _, err = run_cli(["bench", "compare", "--config", str(tmp_path / "shape.yaml"), "--out", str(tmp_path / "b")],
                           capsys)
    one_line_error(code, err, "compare.models must be a mapping")
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(["bench", "compare", "--config", str(cfg), "--out", str(tmp_path / "file")], capsys)
    one_line_error(code, err, "is a file")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, _, err = run_cli(["bench", "compare", "--config", str(cfg), "--out", str(tmp_path / "other")], capsys)
    one_line_error(code, err, "not a comparison folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = run_cli(["bench", "compare", "--config", str(cfg), "--out", str(ro / "cmp")], capsys)
        if code != 0 or not (ro / "cmp").exists():  # root writes anywhere: then there is nothing to refuse
            one_line_error(code, err, "cannot")
    finally:
        ro.chmod(0o700)


def test_a_refused_compare_leaves_nothing_behind(tmp_path, judge_dir, capsys):
    """Issue 19 item 5: everything is checked before anything is written, in a new folder and in
    an earlier comparison's."""
    cfg = write_config(tmp_path / "c.yaml", judge_dir)
    out = tmp_path / "cmp"
    argv = ["bench", "compare", "--config", str(cfg), "--out", str(out), "--quiet"]
    for bad, fragment in ((["compare.judge=/nonexistent"], "judge '/nonexistent'"),
                          (["compare.judge=source"], "compare.judge=source"),
                          (["compare.samplers=[nope]"], "no family has a sampler 'nope'")):
        code, _, err = run_cli([*argv, *bad], capsys)
        one_line_error(code, err, fragment)
        assert not out.exists(), bad
    code, _, err = run_cli([*argv, "--models", "ar", "train.steps=1", "compare.sample_steps=[4]", "compare.infill_lengths=[1]"],
                           capsys)
    assert code == 0, err
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")}
    code, _, err = run_cli([*argv, "--models", "ar", "compare.judge=/nonexistent"], capsys)
    one_line_error(code, err, "judge '/nonexistent'")
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_a_budget_above_a_discrete_processs_T_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "cmp"
    code, _, err = run_cli(["bench", "compare", "--config", "compare-source", "--out", str(out), "--models", "d3pm",
                            "compare.sample_steps=[8,200]"], capsys)
    one_line_error(code, err, "model 'd3pm': its process has T = 128 steps", "200")
    assert not out.exists()


LOCK_HOLDER = """
import fcntl, os, sys, time
os.makedirs(sys.argv[1], exist_ok=True)
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_compare_on_one_out_gets_one_message_whatever_the_first_is_doing(tmp_path, judge_dir, capsys):
    """Issue 19 item 5: the comparison folder itself is locked, from before anything in it is
    read: a second compare meets the same line whether the first has only just created the
    folder or has trained part of its runs, and changes nothing."""
    import subprocess

    cfg = write_config(tmp_path / "c.yaml", judge_dir)
    argv = ["bench", "compare", "--config", str(cfg), "--quiet", "--models", "ar", "train.steps=2",
            "compare.sample_steps=[4]", "compare.infill_lengths=[1]"]
    done = tmp_path / "done"
    code, _, err = run_cli([*argv, "--out", str(done)], capsys)
    assert code == 0, err
    (done / "report.md").unlink()  # as if the first compare were still measuring
    for out in (tmp_path / "new", done):  # the first one has just made the folder / is far along
        before = sorted(p.relative_to(out) for p in out.rglob("*")) if out.exists() else None
        holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "locked"
            code, _, err = run_cli([*argv, "--out", str(out), "train.steps=4"], capsys)
            one_line_error(code, err, f"{out} is in use by another dlm process (pid {holder.pid})")
        finally:
            holder.communicate("", timeout=30)
        after = sorted(p.relative_to(out) for p in out.rglob("*"))
        assert after == (before if before is not None else [__import__("pathlib").Path(".lock")])
    code, _, err = run_cli([*argv, "--out", str(done)], capsys)  # once the first is gone, the folder is usable
    assert code == 0 and (done / "report.md").is_file(), err


def test_compare_on_a_source_of_known_entropy(tmp_path, capsys):
    """compare-source's plumbing at a tiny budget: samples judged exactly by the source, its
    truth and the unigram floor in the likelihood table, GIDD's self-correction beside its own
    sampler (and not for a family without it)."""
    import math

    from dlm.data.sources import SOURCES

    out = tmp_path / "src"
    code, _, err = run_cli(["bench", "compare", "--config", "compare-source", "--out", str(out), "--quiet",
                            "--models", "ar,gidd-pu0.1", "train.steps=2", "compare.samples=2", "compare.sample_steps=[4]",
                            "compare.infill_rows=2", "compare.infill_lengths=[1]", "eval.max_tokens=128",
                            "compare.speed_batches=[1]", "compare.plots=false"], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    src, base = SOURCES.get("markov2"), results["baselines"]
    assert base["source_entropy_rate_bits"] == pytest.approx(src.entropy_rate / math.log(2))
    assert base["source_block_bits"] > base["source_entropy_rate_bits"]
    gidd = results["models"]["gidd-pu0.1"]["runs"]["gidd-pu0.1-s0"]
    assert {"gen@4", "gen:self-correct@4"} <= set(gidd)
    assert "gen:self-correct@4" not in results["models"]["ar"]["runs"]["ar-s0"]
    for part in (gidd["gen@4"], gidd["gen:self-correct@4"]):
        assert part["judge"] == "source:markov2 (exact)"
        assert part["gen_ppl"] == pytest.approx(2 ** part["source_bits_per_token"])  # Gen PPL under the truth
        assert 0 <= part["source_likely_share"] <= 1
    fig = results["models"]["gidd-pu0.1"]["figures"]["gidd-pu0.1-s0"]
    assert "source_bits_per_token@4/self-correct" in fig
    report = (out / "report.md").read_text()
    assert f"| *source markov2: entropy rate* | — | truth | {base['source_entropy_rate_bits']:.3f} |" in report
    assert "| gidd-pu0.1 | self-correct | 4 |" in report and "bits/token under the source" in report
    refs = base["source_reference_samples"]
    assert refs["0"]["source_bits_per_token"] > refs["1"]["source_bits_per_token"] > refs["2"]["source_bits_per_token"]
    assert f"its first-order chain {refs['1']['source_bits_per_token']:.3f} bits" in report


def test_max_train_tokens_keeps_the_first_tokens_and_refuses_too_many():
    full = prepare_data(DataConfig(tokenizer="char"))
    cut = prepare_data(DataConfig(tokenizer="char", max_train_tokens=1000))
    assert len(cut.train) == 1000 and (cut.train[:] == full.train[:1000]).all()
    assert len(cut.val) == len(full.val)
    with pytest.raises(DlmError, match="has only"):
        prepare_data(DataConfig(tokenizer="char", max_train_tokens=len(full.train) + 1))


@pytest.mark.slow
def test_ctrl_c_mid_training_then_a_rerun_continues(tmp_path, judge_dir):
    """A real interruption: SIGINT while the first run trains saves a checkpoint and exits 130;
    running the command again continues that run (not from scratch) and finishes the comparison."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg = write_config(tmp_path / "c.yaml", judge_dir)
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "dlm", "bench", "compare", "--config", str(cfg), "--out", str(out), "--quiet",
           "--models", "ar", "train.steps=3000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:
        if "ar-s0: training" in line:
            break
    metrics = out / "runs" / "ar-s0" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(60) == 130, err
    assert "run the same command to continue" in err
    stopped = int((out / "runs" / "ar-s0" / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 0 < stopped < 3000
    # the rerun asks for fewer steps than 3000 only to keep the test short (train.steps may change on resume)
    rerun = subprocess.run([*cmd[:-1], f"train.steps={stopped + 20}"], capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert "ar-s0: continuing" in rerun.stderr
    assert (out / "report.md").is_file()
