"""Several processes with real torchrun on CPU (Gloo): DDP and FSDP2 (``--parallel fsdp``)
take the steps one process takes with the same global batch, and a checkpoint written by
any number of processes resumes on any other (the optimiser state through
torch.distributed.checkpoint, resharded; the whole weights as one safetensors file)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dlm.checkpoint import begin_checkpoint, checkpoint_shards, commit_checkpoint, latest_checkpoint
from helpers import back_to_step

STEPS, HALF = 6, 3
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
COMMON = ["--size", "tiny", "--seq-len", "32", "--tokenizer", "char", "--seed", "0", "--quiet",
          "train.log_every=1", f"train.ckpt_every={HALF}", "train.keep_checkpoints=3", "train.ema_decay=0.9",
          "train.warmup_steps=2"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dlm"]
ONE = [sys.executable, "-m", "dlm"]


def _run(cmd):
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r["loss"] for r in rows]


def _weights(run: Path, step: int = STEPS) -> dict[str, dict[str, torch.Tensor]]:
    folder = run / "checkpoints" / f"step_{step:08d}"
    return {name: load_file(folder / f"{name}.safetensors") for name in ("model", "ema")}


def _assert_same_weights(a, b, exact=False):
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for k in a[name]:
            if exact:
                assert torch.equal(a[name][k], b[name][k]), f"{name} {k}"
            else:
                torch.testing.assert_close(a[name][k], b[name][k], rtol=1e-4, atol=2e-5, msg=f"{name} {k}")


def _back_to_half(src: Path, dst: Path, **config) -> Path:
    """A copy of run ``src`` as it was at step HALF, with ``config`` written into its config.yaml
    (a new per-rank batch keeps the global batch)."""
    return back_to_step(src, dst, HALF, **config)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with batch 16; two with batch 8 each, under DDP and under FSDP2."""
    d = tmp_path_factory.mktemp("fsdp")
    corpus = d / "text.txt"
    corpus.write_text("".join(f"To be, or not to be, that is the question {i}.\n" for i in range(400)))
    data = ["--family", "mdlm", "--data", str(corpus), "--steps", str(STEPS), *COMMON]
    out = {"corpus": corpus}
    out["one"] = d / "one"
    _run([*ONE, "train", "--out", str(out["one"]), "--batch-size", "16", *data])
    out["ddp"] = d / "ddp"
    _run([*TORCHRUN, "train", "--out", str(out["ddp"]), "--batch-size", "8", *data])
    out["fsdp"] = d / "fsdp"
    r = _run([*TORCHRUN, "train", "--out", str(out["fsdp"]), "--batch-size", "8", "--parallel", "fsdp", *data])
    assert r.stdout.count("trained ") == 1  # rank 0 alone reports
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_follow_one_with_the_same_global_batch(runs, parallel):
    assert _losses(runs[parallel]) == pytest.approx(_losses(runs["one"]), rel=1e-5)
    _assert_same_weights(_weights(runs[parallel]), _weights(runs["one"]))
    rows = [json.loads(line) for line in (runs[parallel] / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["tokens"] == STEPS * 2 * 8 * 32


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_checkpoint_of_two_processes_holds_whole_weights_and_sharded_optimiser(runs, parallel):
    run = runs[parallel]
    assert checkpoint_shards(run) == latest_checkpoint(run) / "dcp"
    assert (checkpoint_shards(run) / ".metadata").is_file()
    trainer = torch.load(latest_checkpoint(run) / "trainer.pt", weights_only=True)
    assert trainer["optimizer"] is None and trainer["loader"]
    assert checkpoint_shards(runs["one"]) is None  # one process: today's format
    one = _weights(runs["one"])
    for name, tensors in _weights(run).items():  # whole tensors, the names a single process uses
        assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in one[name].items()}
    from dlm.runs import load_run

    assert load_run(run, device="cpu").step == STEPS  # what `dlm eval` / `dlm sample` open


def test_fsdp_run_resumes_on_two_processes_exactly(runs, tmp_path):
    run = _back_to_half(runs["fsdp"], tmp_path / "again")
    _run([*TORCHRUN, "train", "--out", str(run), "--resume"])
    _assert_same_weights(_weights(run), _weights(runs["fsdp"]), exact=True)
    assert _losses(run) == _losses(runs["fsdp"])


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_checkpoint_resumes_on_one(runs, parallel, tmp_path):
    run = _back_to_half(runs[parallel], tmp_path / "on-one", batch_size=16)
    _run([*ONE, "train", "--out", str(run), "--resume", "--quiet"])
    assert latest_checkpoint(run).name == f"step_{STEPS:08d}"
    assert checkpoint_shards(run) is None  # one process writes today's format again
    _assert_same_weights(_weights(run), _weights(runs["one"]))
    assert _losses(run) == pytest.approx(_losses(runs["one"]), rel=1e-5)


def test_one_process_checkpoint_resumes_on_two_with_fsdp(runs, tmp_path):
    run = _back_to_half(runs["one"], tmp_path / "on-two", batch_size=8, parallel="fsdp")
    _run([*TORCHRUN, "train", "--out", str(run), "--resume", "--quiet"])
    assert checkpoint_shards(run) is not None
    _assert_same_weights(_weights(run), _weights(runs["one"]))
    assert _losses(run) == pytest.approx(_losses(runs["one"]), rel=1e-5)


def test_two_process_checkpoint_resumes_on_one_through_the_cli_flags(runs, tmp_path):
    """Without touching config.yaml: the per-rank batch stays, so the global batch halves."""
    run = _back_to_half(runs["fsdp"], tmp_path / "plain")
    _run([*ONE, "train", "--out", str(run), "--resume", "--steps", str(STEPS + 1), "--quiet"])
    assert latest_checkpoint(run).name == f"step_{STEPS + 1:08d}"


def test_a_failed_commit_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import dlm.checkpoint as ckpt_mod

    w = {"w": torch.ones(2)}
    tmp = begin_checkpoint(tmp_path, 1)
    (tmp / "dcp").mkdir()
    (tmp / "dcp" / "__0_0.distcp").write_bytes(b"shard")
    commit_checkpoint(tmp_path, 1, tmp, w, None, {"optimizer": None})
    assert latest_checkpoint(tmp_path).name == "step_00000001" and checkpoint_shards(tmp_path) is not None
    assert begin_checkpoint(tmp_path, 1) is None  # complete already: only `latest` would move

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    tmp = begin_checkpoint(tmp_path, 2)
    monkeypatch.setattr(ckpt_mod.torch, "save", disk_full)
    with pytest.raises(OSError):
        commit_checkpoint(tmp_path, 2, tmp, w, None, {"optimizer": None})
    assert not tmp.exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000001"]
