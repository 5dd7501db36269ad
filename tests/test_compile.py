"""``dlm train --compile``: torch.compile of the transformer blocks computes what the eager
model computes (logits and gradients within float tolerance), trains along the same loss
curve, writes checkpoints with the same keys (no ``_orig_mod.``), may be switched on or off
by ``--resume``, works under DDP and FSDP2, and fails with one line where inductor cannot
build. Compiling takes tens of seconds on 2 CPU cores: those tests are marked slow."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dlm.backbones.transformer import Transformer, TransformerConfig
from dlm.train import compile_blocks
from helpers import TINY, back_to_step, one_line_error, run

STEPS, HALF = 6, 3
COMMON = [*TINY, "train.log_every=1", f"train.ckpt_every={HALF}", "train.keep_checkpoints=3", "train.ema_decay=0.9",
          "train.warmup_steps=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    f = tmp_path_factory.mktemp("corpus") / "text.txt"
    f.write_text("".join(f"To be, or not to be, that is the question {i}.\n" for i in range(400)))
    return f


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> list[float]:
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r["loss"] for r in rows]


def _weights(run_dir: Path, step: int = STEPS) -> dict[str, dict[str, torch.Tensor]]:
    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    return {name: load_file(folder / f"{name}.safetensors") for name in ("model", "ema")}


def _assert_close_weights(a, b):
    for name in a:
        assert a[name].keys() == b[name].keys(), name  # plain names, whether compiled or not
        for k in a[name]:
            torch.testing.assert_close(a[name][k], b[name][k], rtol=1e-4, atol=2e-5, msg=f"{name} {k}")


@pytest.mark.slow
@pytest.mark.parametrize("shape", [dict(cond_dim=32), dict(causal=True)], ids=["dit-time-conditioned", "causal"])
def test_compiled_blocks_give_the_eager_logits_and_gradients(shape, gen):
    torch._dynamo.reset()
    eager = Transformer(TransformerConfig(vocab_in=50, vocab_out=49, n_layer=2, n_head=2, d_model=32, **shape))
    with torch.no_grad():  # the head and adaLN start at zero: give every weight a value so gradients flow
        for p in eager.parameters():
            p.normal_(0, 0.1, generator=gen)
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints keep plain names

    x = torch.randint(0, 50, (3, 16), generator=gen)
    t = torch.rand(3, generator=gen) if shape.get("cond_dim") else None
    pad = torch.zeros(3, 16, dtype=torch.bool)
    pad[0, 12:] = True  # the masked attention path too
    logits = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        out = model(x, t, pad=pad)
        (out.log_softmax(-1)[..., 0].sum() + out.square().mean()).backward()
        logits[name] = out.detach()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the blocks really ran compiled
    torch.testing.assert_close(logits["compiled"], logits["eager"], rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """eager and compiled: 6 steps each. on-off: the compiled run resumed from step 3 without
    --compile; off-on: the eager run resumed from step 3 with it (`--resume` switches both ways)."""
    from dlm.cli import main

    d = tmp_path_factory.mktemp("compile")
    base = ["train", "--family", "mdlm", "--data", str(corpus), "--steps", str(STEPS), *COMMON]
    out = {"eager": d / "eager", "compiled": d / "compiled"}
    assert main([*base, "--out", str(out["eager"])]) == 0
    assert main([*base, "--out", str(out["compiled"]), "--compile"]) == 0
    for name, src, flag in (("on-off", "compiled", "--no-compile"), ("off-on", "eager", "--compile")):
        out[name] = back_to_step(out[src], d / name, HALF)
        assert main(["train", "--out", str(out[name]), "--resume", flag, "--quiet"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["compiled", "on-off", "off-on"])
def test_a_compiled_run_follows_the_eager_loss_curve_and_checkpoints_alike(runs, name):
    assert _losses(runs[name]) == pytest.approx(_losses(runs["eager"]), rel=1e-4)
    _assert_close_weights(_weights(runs[name]), _weights(runs["eager"]))
    _assert_close_weights(_weights(runs[name], HALF), _weights(runs["eager"], HALF))


@pytest.mark.slow
def test_compile_time_is_reported_apart_from_tokens_per_s(runs):
    rows = {name: _rows(runs[name]) for name in runs}
    assert not any("compile_s" in r for r in rows["eager"])
    # the compiling step of each session: its compile_s logged, and no tokens/s for a window of it alone
    for name, first in (("compiled", 1), ("on-off", 1), ("off-on", HALF + 1)):
        compiled = [r for r in rows[name] if "compile_s" in r]
        assert [r["step"] for r in compiled] == [first] and compiled[0]["compile_s"] > 0
        assert "tokens_per_s" not in compiled[0]
        assert all(r["tokens_per_s"] > 0 for r in rows[name] if r["step"] != first)


@pytest.mark.slow
def test_a_compiled_run_samples_and_evaluates_eagerly(runs, capsys):
    from dlm.cli import main

    capsys.readouterr()
    assert main(["sample", str(runs["off-on"]), "--num", "1", "--steps", "4", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["samples"]) == 1
    assert main(["eval", str(runs["off-on"]), "--max-tokens", "256", "--mc-samples", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nll"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_compiled_blocks_under_two_processes_follow_one_eager(parallel, corpus, tmp_path):
    """DDP and FSDP2 wrap the compiled blocks; the global batch (2 × 8) is the eager run's (1 × 16)
    only here, so the reference is a one-process eager run of batch 16."""
    import os

    from dlm.cli import main

    data = ["train", "--family", "mdlm", "--data", str(corpus), "--steps", str(STEPS), *COMMON]
    one = tmp_path / "one"
    assert main([*data, "--out", str(one), "--batch-size", "16"]) == 0
    two = tmp_path / parallel
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dlm"]
    r = subprocess.run([*torchrun, *data, "--out", str(two), "--batch-size", "8", "--parallel", parallel, "--compile",
                        "--json"], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["compile_s"] > 0  # the summary reports it apart
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4)
    _assert_close_weights(_weights(two), _weights(one))


def test_no_compiler_is_one_line_and_no_run_folder(corpus, tmp_path, capsys, monkeypatch):
    import torch._inductor.config as inductor_config

    # as on a machine without g++: inductor's CPU kernels cannot be built. (inductor's own patch,
    # not monkeypatch: undoing a monkeypatch deletes the key from the config, and every later
    # compile in the session then fails with "torch._inductor.config.cpp.cxx does not exist")
    out = tmp_path / "r"
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        code, _, err = run(["train", "--data", str(corpus), "--out", str(out), "--steps", "2", *TINY, "--compile"],
                           capsys)
    one_line_error(code, err, "--compile", "C++ compiler")
    assert not out.exists()


def test_compile_is_on_by_default_on_cuda_only():
    from dlm.config import RunConfig
    from dlm.schema import TrainConfig
    from dlm.trainer.compiling import with_compile_resolved

    unset = RunConfig()
    assert unset.train.compile is None
    assert with_compile_resolved(unset, torch.device("cuda")).train.compile is True
    assert with_compile_resolved(unset, torch.device("cpu")).train.compile is False
    for chosen in (True, False):  # the override, on either device
        cfg = RunConfig(train=TrainConfig(compile=chosen))
        assert all(with_compile_resolved(cfg, torch.device(d)).train.compile is chosen for d in ("cpu", "cuda"))


def test_unset_compile_trains_eagerly_on_the_cpu_and_is_recorded(corpus, tmp_path, capsys):
    import yaml

    out = tmp_path / "r"
    code, stdout, err = run(["train", "--data", str(corpus), "--out", str(out), "--steps", "2", *TINY, "--json"], capsys)
    assert code == 0, err
    assert "compile_s" not in json.loads(stdout.strip().splitlines()[-1])
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["compile"] is False
    code, _, err = run(["train", "--data", str(corpus), "--out", str(tmp_path / "bad"), "--steps", "2", *TINY,
                        "train.compile=maybe"], capsys)
    one_line_error(code, err, "train.compile")
    assert not (tmp_path / "bad").exists()
