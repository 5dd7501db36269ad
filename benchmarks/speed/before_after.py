"""CPU before/after of the host-sync / static-shape / padded-vocabulary change (issue 18):
the code of two commits, each extracted with ``git archive`` and run from its ``src/``,
interleaved (before, after, before, after …) in fresh one-thread processes.

    nice -n 5 python benchmarks/speed/before_after.py BEFORE AFTER [--repeats 2] [--size tiny]
        [--sample-length 128] [--parts train,sample] [--json before_after.json] [--train-steps 12]

* ``dlm train`` AR and MDLM ``tiny`` (built-in Shakespeare, BPE 4,096, sequences of 128,
  batch 32, 12 steps logged every 3; steady state: the median of the windows after the
  first), tokens/s;
* samples/s of the AR sampler (KV cache), masked ancestral and Fast-dLLM at 128 tokens,
  batch 1 and 16, from the first tiny run each commit trained (a run folder of the newer code
  holds config keys the older one does not read).

``--size mini`` trains ``mini`` instead (``--train-steps`` steps, logged every 3); ``--sample-length``
samples that many tokens; ``--parts`` runs only the training or the sampling part (sampling
needs a tiny run of each commit, trained first in any case: 1 step when training is not timed).
Writes ``before_after.json`` (``--json``) beside this file.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DATA = ["--data", "shakespeare", "--tokenizer", "bpe", "--vocab-size", "4096", "--seq-len", "128", "--batch-size", "32"]
SAMPLE = """
import json, sys, time, torch
from pathlib import Path
from dlm.runs import load_run
from dlm.service.sampling import generate, sampler_settings
run = load_run(Path(sys.argv[1]), device="cpu")
out = {}
for sampler in sys.argv[2].split(","):
    for batch in (1, 16):
        s = sampler_settings(run, name=sampler)
        generate(run, batch, 16, settings=s)
        _, nfe, seconds = generate(run, batch, int(sys.argv[3]), settings=s, seed=1)
        out[f"{sampler}@{batch}"] = {"samples_per_s": batch / seconds, "network_calls": nfe}
print(json.dumps(out))
"""


def run(src: Path, argv: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def option(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def train_rate(src: Path, family: str, out: Path, size: str = "tiny", steps: int = 12) -> float | None:
    run(src, ["-m", "dlm", "train", "--family", family, "--size", size, *DATA, "--steps", str(steps), "--seed", "0",
              "--out", str(out), "--quiet", "train.log_every=3"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows[1:] if "tokens_per_s" in r]
    return statistics.median(rates) if rates else None


def extract(commit: str, dest: Path) -> Path:
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "src"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def main() -> None:
    before, after = sys.argv[1], sys.argv[2]
    repeats = int(option("--repeats", "2"))
    size, length, parts = option("--size", "tiny"), option("--sample-length", "128"), option("--parts", "train,sample")
    steps = int(option("--train-steps", "12"))
    rows: dict = {}
    with tempfile.TemporaryDirectory(prefix="dlm-ba-") as d:
        work = Path(d)
        srcs = {"before": extract(before, work / "before"), "after": extract(after, work / "after")}
        run(srcs["after"], ["-m", "dlm", "train", "--size", "tiny", *DATA, "--steps", "1", "--out",
                            str(work / "warm"), "--quiet"])  # the tokenizer's cache, before any timing
        for rep in range(repeats):
            for family in ("ar", "mdlm"):
                for which, src in srcs.items():
                    load = os.getloadavg()[0]
                    if "sample" in parts and rep == 0 and not (size == "tiny" and "train" in parts):  # the run sampled from
                        train_rate(src, family, work / f"{which}-{family}-0", "tiny", 12 if size == "tiny" else 1)
                    if "train" not in parts:
                        continue
                    folder = work / f"{which}-{family}-{rep}" if size == "tiny" else work / f"{which}-{family}-{size}-{rep}"
                    rate = train_rate(src, family, folder, size, steps)
                    rows.setdefault(f"train {family} {size}", {}).setdefault(which, []).append(rate)
                    rows.setdefault(f"load train {family} {size}", {}).setdefault(which, []).append(load)
                    print(f"[{rep}] train {family} {size} {which:6s} {rate:8,.0f} tokens/s  load {load:.1f}", flush=True)
            if "sample" not in parts:
                continue
            for family, samplers in (("ar", "ancestral"), ("mdlm", "ancestral,fast-dllm")):
                for which, src in srcs.items():
                    folder = work / f"{which}-{family}-0"  # each code samples from its own run (config keys differ)
                    load = os.getloadavg()[0]
                    out = json.loads(run(src, ["-c", SAMPLE, str(folder), samplers, length]).strip().splitlines()[-1])
                    rows.setdefault(f"load sample {family} {length}", {}).setdefault(which, []).append(load)
                    for key, v in out.items():
                        rows.setdefault(f"sample {family} {length} {key}", {}).setdefault(which, []).append(v["samples_per_s"])
                        print(f"[{rep}] sample {family} {key:16s} {which:6s} {v['samples_per_s']:8.2f} samples/s",
                              flush=True)
    table = {k: {w: statistics.median(v) for w, v in r.items()} | {"runs": r} for k, r in rows.items()}
    result = {"command": "nice -n 5 python benchmarks/speed/before_after.py " + " ".join(sys.argv[1:]),
              "before": before, "after": after, "date": time.strftime("%Y-%m-%d %H:%M"), "rows": table,
              "loadavg_end": os.getloadavg()[0]}
    (HERE / option("--json", "before_after.json")).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
