"""The command line end to end on a tiny model: train → checkpoint → resume → eval → sample,
clean stops, and one clear line for every kind of bad input."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dlm.cli import main
from helpers import TINY, one_line_error, run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    f = d / "text.txt"
    f.write_text("".join(f"To be, or not to be, that is the question {i}.\n" for i in range(400)))
    return f


@pytest.mark.parametrize("family,objective", [("mdlm", "nelbo"), ("ar", "ce"), ("usdm", "sddlm-v1")])
def test_train_resume_eval_sample(family, objective, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(["train", "--family", family, "--objective", objective, "--data", str(corpus), "--out", str(out), "--steps", "6", *TINY], capsys)
    assert code == 0, err
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert (out / "checkpoints" / "step_00000006" / "model.safetensors").is_file()

    code, _, err = run(["train", "--out", str(out), "--resume", "--steps", "10", "--quiet"], capsys)
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [6, 10]  # each run logs its last step; no step twice across the resume

    code, stdout, err = run(["eval", str(out), "--json", "--mc-samples", "2"], capsys)
    assert code == 0, err
    r = json.loads(stdout)
    assert {"nll", "ppl", "bits_per_token", "bits_per_byte", "stderr", "tokens"} <= set(r)
    assert r["step"] == 10 and r["bound"] == (family != "ar")
    assert r["ppl"] == pytest.approx(torch.tensor(r["nll"]).exp().item(), rel=1e-6)
    assert 0 < r["nll"] < 10 and r["stderr"] > 0

    code, stdout, err = run(["sample", str(out), "--num", "2", "--steps", "8", "--prompt", "To be", "--json"], capsys)
    assert code == 0, err
    s = json.loads(stdout)
    assert len(s["samples"]) == 2 and all(t.startswith("To be") for t in s["samples"])
    assert s["seconds"] > 0


def test_eval_on_other_data_and_train_split(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["train", "--family", "ar", "--data", str(corpus), "--out", str(out), "--steps", "3", *TINY], capsys)[0] == 0
    other = tmp_path / "other.txt"
    other.write_text("that is the question.\n" * 300)
    code, stdout, err = run(["eval", str(out), "--data", str(other), "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["data"] == str(other)
    code, stdout, _ = run(["eval", str(out), "--split", "train", "--max-tokens", "256", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["tokens"] == 256


def _cli(*args, env=None):
    return [sys.executable, "-m", "dlm", *args]


def _train_cmd(corpus, out, steps):
    return _cli("train", "--family", "mdlm", "--data", str(corpus), "--out", str(out), "--steps", str(steps),
                *TINY, "train.log_every=1", "train.ema_decay=0.99")


def test_sigterm_checkpoints_and_resume_is_exact(corpus, tmp_path):
    """A run stopped by SIGTERM and resumed ends with exactly the weights of a run never stopped."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = 60
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(corpus, straight, steps), check=True, env=env, capture_output=True)

    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(_train_cmd(corpus, stopped, steps), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = stopped / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err.decode()
    assert b"--resume" in err
    at = int((stopped / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 5 <= at < steps

    resumed = subprocess.run(_cli("train", "--out", str(stopped), "--resume", "--quiet"), env=env, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(straight / "checkpoints" / f"step_{steps:08d}" / name)
        b = load_file(stopped / "checkpoints" / f"step_{steps:08d}" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    # and the files byte for byte (issue 19: safetensors' metadata order varied by process), all
    # but clock.json, the wall clock's counters
    def files(run):
        folder = run / "checkpoints" / f"step_{steps:08d}"
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.name != "clock.json"}
    assert files(straight) == files(stopped) and {"model.safetensors", "trainer.pt"} <= set(files(straight))
    lines = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, steps + 1))


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    r = subprocess.run(_cli("eval", str(tmp_path / "missing")), capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("dlm: error:") and "Traceback" not in r.stderr


# ---- bad input: one line, exit 2, nothing half-written ----------------------------------

def test_missing_data(tmp_path, capsys):
    code, _, err = run(["train", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "r"), *TINY], capsys)
    one_line_error(code, err, "not a file, a folder or a known corpus")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("content,fragment", [(b"", "is empty"), (b"\x80\x81 not text", "not UTF-8"), (b"\n \n", "no text")])
def test_bad_data_files(tmp_path, capsys, content, fragment):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    code, _, err = run(["train", "--data", str(f), "--out", str(tmp_path / "r"), *TINY], capsys)
    one_line_error(code, err, fragment)
    assert not (tmp_path / "r").exists()


def test_too_little_data_for_the_sequence_length(tmp_path, capsys):
    f = tmp_path / "short.txt"
    f.write_text("only a few words\n")
    code, _, err = run(["train", "--data", str(f), "--out", str(tmp_path / "r"), *TINY], capsys)
    one_line_error(code, err, "fewer than one sequence")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--seq-len", "1"], "'data.seq_len' must be in [2, 65536], got 1"),
        (["--seq-len", "100000"], "'data.seq_len' must be in [2, 65536], got 100000"),
        (["--family", "gaussian-bogus"], "unknown family 'gaussian-bogus'"),
        (["--tokenizer", "wordpiece"], "unknown tokenizer 'wordpiece'"),
        (["--size", "huge"], "unknown model size 'huge'"),
        (["train.lrr=1"], "unknown config key 'train.lrr'"),
        (["--schedule", "sqrt"], "unknown schedule 'sqrt'"),
        (["--objective", "sedd"], "unknown masked-diffusion objective 'sedd'"),
        (["--family", "usdm", "--objective", "sedd"], "unknown uniform-state diffusion objective 'sedd'"),
        (["--family", "usdm", "--objective", "sddlm-v1", "objective.reg_eps=0"], "'objective.reg_eps' must be > 0"),
        (["--family", "usdm", "--objective", "sddlm-v1", "sddlm.reg_eps=0"], "'objective.reg_eps' must be > 0"),
        (["--family", "usdm", "--objective", "sddlm-v1", "objective.lambda=1"], "unknown config key 'objective.lambda'"),
        (["--family", "usdm", "objective.reg_weight=1"], "objective 'nelbo' takes no settings"),
        (["--family", "ar", "time_conditioning=true"], "no diffusion time to condition on"),
        (["--family", "mdlm", "sampler.steps=0"], "'sampler.steps' must be ≥ 1, got 0"),
        (["model.dropout=2"], "'model.dropout' must be in [0, 1)"),
        (["train.beta2=1.5"], "'train.beta2' must be in [0, 1)"),
        (["train.min_lr_ratio=-1"], "'train.min_lr_ratio' must be in [0, 1]"),
        (["--lr", "inf"], "'train.lr' must be a finite number"),
    ],
)
def test_bad_settings(corpus, tmp_path, capsys, argv, fragment):
    code, _, err = run(["train", "--data", str(corpus), "--out", str(tmp_path / "r"), "--steps", "2", *TINY, *argv], capsys)
    one_line_error(code, err, fragment)
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--family", "mdlm", "--data", str(corpus), "--out", str(out), "--steps", "2", *TINY]) == 0
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_existing_run_is_not_overwritten(trained, corpus, capsys):
    before = (trained / "checkpoints" / "latest").read_text()
    code, _, err = run(["train", "--data", str(corpus), "--out", str(trained), *TINY], capsys)
    one_line_error(code, err, "already holds a run", "--resume")
    assert (trained / "checkpoints" / "latest").read_text() == before


def test_missing_and_foreign_run_folders(tmp_path, capsys):
    one_line_error(*run(["eval", str(tmp_path / "nope")], capsys)[::2], "does not exist")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "model.pt").write_bytes(b"not ours")
    one_line_error(*run(["sample", str(tmp_path / "foreign")], capsys)[::2], "not a dlm run folder")


def test_corrupt_checkpoint(trained, tmp_path, capsys):
    run_dir = _copy(trained, tmp_path / "corrupt")
    weights = run_dir / "checkpoints" / "step_00000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    one_line_error(*run(["eval", str(run_dir)], capsys)[::2], "corrupt")
    one_line_error(*run(["eval", str(run_dir), "--no-ema"], capsys)[::2], "corrupt")


def test_missing_checkpoint(trained, tmp_path, capsys):
    run_dir = _copy(trained, tmp_path / "nockpt")
    import shutil

    shutil.rmtree(run_dir / "checkpoints")
    one_line_error(*run(["sample", str(run_dir)], capsys)[::2], "no checkpoint")


def test_tokenizer_that_does_not_match_the_checkpoint(trained, tmp_path, capsys):
    from dlm.data import TOKENIZERS

    run_dir = _copy(trained, tmp_path / "mismatch")
    TOKENIZERS.get("char").build(["abc"], 0).save(run_dir / "tokenizer.json")
    one_line_error(*run(["eval", str(run_dir)], capsys)[::2], "do not belong together")
    TOKENIZERS.get("byte").build([], 0).save(run_dir / "tokenizer.json")
    one_line_error(*run(["sample", str(run_dir)], capsys)[::2], "'byte' tokenizer")


def test_resume_refuses_a_different_tokenizer(trained, tmp_path, capsys):
    run_dir = _copy(trained, tmp_path / "resume")
    one_line_error(*run(["train", "--out", str(run_dir), "--resume", "--tokenizer", "bpe", "--steps", "4"], capsys)[::2],
                   "data.tokenizer is 'char'")
    one_line_error(*run(["train", "--out", str(run_dir), "--resume", "--quiet"], capsys)[::2], "already finished 2 steps")


def test_switching_sampler_starts_from_its_own_defaults(trained, capsys):
    """A run left at the ancestral sampler (boolean ``cache``) samples with Fast-dLLM (whose
    ``cache`` is a mode): the ancestral setting does not carry over, and Fast-dLLM's own errors
    are the ones reported (issue 19, item 1)."""
    code, out, err = run(["sample", str(trained), "--sampler", "fast-dllm", "--num", "2", "--length", "8"], capsys)
    assert code == 0, err
    assert len([line for line in out.splitlines() if line.strip()]) >= 2
    for bad, words in [("sampler.threshold=-1", "threshold"), ("sampler.threshold=nan", "threshold"),
                       ("sampler.block_length=0", "block_length"), ("sampler.cache=true", "cache")]:
        code, _, err = run(["sample", str(trained), "--sampler", "fast-dllm", bad], capsys)
        one_line_error(code, err, words)
        assert "must be a string, got True" not in err or bad == "sampler.cache=true"


def test_sample_length_longer_than_trained(trained, capsys):
    one_line_error(*run(["sample", str(trained), "--length", "4096"], capsys)[::2], "--length must be in [1, 32]")
    one_line_error(*run(["sample", str(trained), "--length", "4", "--prompt", "To be or not"], capsys)[::2],
                   "must be shorter than --length")
    one_line_error(*run(["sample", str(trained), "--top-p", "0"], capsys)[::2], "--top-p must be in (0, 1], got 0.0")
    # a zero is refused, never silently replaced by the default
    one_line_error(*run(["sample", str(trained), "--steps", "0"], capsys)[::2], "--steps must be ≥ 1, got 0")
    one_line_error(*run(["sample", str(trained), "--length", "0"], capsys)[::2], "--length must be in [1, 32]")
    one_line_error(*run(["sample", str(trained), "--temperature", "nan"], capsys)[::2], "--temperature must be a finite number")
    one_line_error(*run(["eval", str(trained), "--mc-samples", "0"], capsys)[::2], "--mc-samples must be ≥ 1, got 0")
    one_line_error(*run(["eval", str(trained), "--batch-size", "0"], capsys)[::2], "--batch-size must be ≥ 1, got 0")


def test_quickstart_command_path(tmp_path, capsys):
    """The quickstart's own path (built-in corpus, BPE, train, eval, samples, run folder), shortened."""
    out = tmp_path / "qs"
    code = main(["quickstart", "--out", str(out), "--steps", "3", "--quiet", "model.size=tiny",
                 "eval.max_tokens=1024", "sample.steps=4", "data.seq_len=32"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["train"]["step"] == 3 and summary["eval"]["bound"] is True
    assert "unigram_bits_per_byte" in summary["eval"]
    assert len(summary["samples"]["samples"]) == 4
    assert (out / "samples.txt").read_text().startswith("──── sample 1")
    assert "bits/byte" in stdout and str(out) in stdout


def test_torchrun_two_processes(corpus, tmp_path):
    """Real torchrun, two CPU ranks over Gloo: train, resume, evaluate."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dlm"]
    args = ["--family", "mdlm", "--data", str(corpus), "--out", str(out), *TINY, "train.log_every=1"]
    r = subprocess.run([*launch, "train", "--steps", "4", *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("trained ") == 1  # rank 0 alone reports
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert rows[-1]["tokens"] == 4 * 2 * 8 * 32  # steps × ranks × batch per rank × seq_len
    r = subprocess.run([*launch, "train", "--out", str(out), "--resume", "--steps", "6", "--quiet"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    r = subprocess.run(_cli("eval", str(out), "--json"), capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["step"] == 6


def test_quickstart_with_the_ar_family(tmp_path, capsys):
    out = tmp_path / "qs-ar"
    code = main(["quickstart", "--family", "ar", "--out", str(out), "--steps", "2", "--quiet", "model.size=tiny",
                 "eval.max_tokens=512", "data.seq_len=16"])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads((out / "quickstart.json").read_text())["eval"]["bound"] is False


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(trained, tmp_path, monkeypatch):
    import dlm.checkpoint as ckpt_mod

    run_dir = _copy(trained, tmp_path / "crash")
    (run_dir / "checkpoints" / ".tmp-step_00000009-killed").mkdir()  # as a SIGKILLed writer leaves it
    ckpt = ckpt_mod.load_checkpoint(run_dir)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", disk_full)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(OSError):
        ckpt_mod.save_checkpoint(run_dir, 4, model, None, {"step": 4})
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "step_00000004" not in names and not any(n.startswith(".tmp-step_00000004") for n in names)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert ckpt_mod.load_checkpoint(run_dir).step == ckpt.step == 2
    monkeypatch.undo()
    assert main(["train", "--out", str(run_dir), "--resume", "--steps", "3", "--quiet"]) == 0
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["latest", "step_00000002", "step_00000003"]  # the killed writer's folder is gone


def test_the_divergence_message_names_the_checkpoint_that_exists():
    """Losses seen finite up to a step do not make a checkpoint: the message says which one is
    intact, or that none was written."""
    from dlm.errors import DlmError
    from dlm.trainer.divergence import DivergenceGuard

    for saved, words in [(None, "no checkpoint was written"), (4, "the checkpoint of step 4 is intact")]:
        guard = DivergenceGuard(torch.device("cpu"), step=0)
        guard.observe(torch.tensor(1.0))
        guard.check(5, saved)  # finite: passes, and step 5 is the last seen finite
        guard.observe(torch.tensor(float("nan")))
        with pytest.raises(DlmError) as e:
            guard.check(8, saved)
        assert "between steps 6 and 8" in str(e.value) and words in str(e.value)


def test_a_diverging_run_stops_with_one_line_and_can_start_again(corpus, tmp_path, capsys):
    """A learning rate that blows the loss up: one line naming the steps, no checkpoint of a
    diverged model, and the same folder takes a fresh start (nothing was saved to resume)."""
    out = tmp_path / "run"
    argv = ["train", "--family", "ar", "--data", str(corpus), "--out", str(out), "--steps", "6", *TINY,
            "train.grad_clip=0", "train.warmup_steps=0", "train.log_every=3"]
    one_line_error(*run([*argv, "train.lr=1e30"], capsys)[::2], "training diverged", "between steps 1 and 3",
                   "no checkpoint was written")
    assert not (out / "checkpoints").exists()
    code, _, err = run([*argv, "train.lr=1e-3"], capsys)
    assert code == 0, err
