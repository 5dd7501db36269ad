"""Foundation benchmark: training throughput of AR vs MDLM at equal size, quickstart wall
time, the quickstart's bits per byte next to an AR baseline trained for the same time, and
the two estimators of the MDLM NELBO (over t, over the masked count) trained for equal time.

    python benchmarks/foundation.py            # ~25 min on 2 CPU cores
    python benchmarks/foundation.py --quick    # throughput only

Writes benchmarks/results/foundation.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dlm.bench.report import machine  # one description of the machine (benchmarks/samplers imports it from here)

HERE = Path(__file__).parent
OBJECTIVE = {"ar": ["--objective", "ce"], "mdlm": []}  # the quickstart config names MDLM's objective


def dlm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlm", *args], check=True, capture_output=True, text=True)


def dlm_out(*args: str, threads: int | None = None) -> str:
    """stdout of ``python -m dlm ARGS``; stops the benchmark with dlm's stderr if it fails."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, "-m", "dlm", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"dlm {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def finished(run: Path, steps: int) -> bool:
    """The run in ``run`` has its checkpoint of step ``steps`` (a benchmark resumes past it)."""
    latest = run / "checkpoints" / "latest"
    return latest.is_file() and latest.read_text().strip() == f"step_{steps:08d}"


def throughput(tmp: Path, family: str, size: str, steps: int = 40) -> float:
    """Training tokens/s (forward + backward + AdamW + EMA) after the first 10 steps."""
    out = tmp / f"tp-{family}-{size}"
    dlm("train", "--config", "quickstart", "--family", family, "--size", size, "--steps", str(steps),
        "--out", str(out), "--quiet", "train.log_every=10", *OBJECTIVE[family])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows[1:]]  # the first window holds the warm-up
    return sum(rates) / len(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="throughput only")
    ap.add_argument("--sizes", default="tiny,mini")
    ap.add_argument("--ablation-seconds", type=float, default=120.0)
    args = ap.parse_args()
    results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        dlm("train", "--config", "quickstart", "--steps", "1", "--out", str(tmp / "warm"), "--quiet")  # fill the token cache
        results["throughput"] = [
            {"family": fam, "size": size, "tokens_per_s": round(throughput(tmp, fam, size))}
            for size in args.sizes.split(",")
            for fam in ("ar", "mdlm")
        ]
        if not args.quick:
            t0 = time.perf_counter()
            dlm("quickstart", "--out", str(tmp / "qs"), "--quiet")
            wall = time.perf_counter() - t0
            qs = json.loads((tmp / "qs" / "quickstart.json").read_text())
            budget = qs["train"]["elapsed_s"]
            dlm("train", "--config", "quickstart", "--family", "ar", *OBJECTIVE["ar"], "--steps", "1000000",
                "--time-budget", str(budget), "--out", str(tmp / "ar"), "--quiet")
            ar = json.loads(dlm("eval", str(tmp / "ar"), "--json").stdout)
            ablation = []
            for objective in ("nelbo", "nelbo-count"):
                run = tmp / f"abl-{objective}"
                dlm("train", "--config", "quickstart", "--objective", objective, "--steps", "1000000",
                    "--time-budget", str(args.ablation_seconds), "--out", str(run), "--quiet")
                ev = json.loads(dlm("eval", str(run), "--json").stdout)
                ablation.append({"objective": objective, "train_s": args.ablation_seconds, "steps": ev["step"],
                                 "bits_per_byte": ev["bits_per_byte"], "stderr_bits_per_byte": ev["stderr_bits_per_byte"]})
            results["objective_ablation"] = ablation
            results["quickstart"] = {
                "wall_s": round(wall, 1),
                "train_s": round(budget, 1),
                "steps": qs["train"]["step"],
                "bits_per_byte": qs["eval"]["bits_per_byte"],
                "stderr_bits_per_byte": qs["eval"]["stderr_bits_per_byte"],
                "unigram_bits_per_byte": qs["eval"]["unigram_bits_per_byte"],
                "byte_unigram_bits_per_byte": qs["eval"]["byte_unigram_bits_per_byte"],
                "samples": qs["samples"]["samples"],
            }
            results["ar_same_time"] = {
                "train_s": budget,
                "steps": ar["step"],
                "bits_per_byte": ar["bits_per_byte"],
                "stderr_bits_per_byte": ar["stderr_bits_per_byte"],
            }
    out = HERE / "results" / "foundation.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print("| family | size | training tokens/s |\n|---|---|---|")
    for r in results["throughput"]:
        print(f"| {r['family']} | {r['size']} | {r['tokens_per_s']:,} |")
    if "quickstart" in results:
        q, a = results["quickstart"], results["ar_same_time"]
        print(f"\nquickstart: {q['wall_s'] / 60:.1f} min wall, {q['steps']} steps in {q['train_s']:.0f} s; "
              f"MDLM {q['bits_per_byte']:.3f} ± {q['stderr_bits_per_byte']:.3f} bits/byte (upper bound), "
              f"AR same time {a['bits_per_byte']:.3f} ({a['steps']} steps), token unigram "
              f"{q['unigram_bits_per_byte']:.3f}, byte unigram {q['byte_unigram_bits_per_byte']:.3f}")
        for r in results["objective_ablation"]:
            print(f"MDLM tiny, {r['objective']}, {r['train_s']:.0f} s: {r['bits_per_byte']:.3f} ± "
                  f"{r['stderr_bits_per_byte']:.3f} bits/byte ({r['steps']} steps)")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
