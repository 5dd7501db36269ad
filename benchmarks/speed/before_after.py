"""CPU before/after of the host-sync / static-shape / padded-vocabulary change (issue 18):
the code of two commits, each extracted with ``git archive`` and run from its ``src/``,
interleaved (before, after, before, after …) in fresh one-thread processes.

    nice -n 5 python benchmarks/speed/before_after.py BEFORE AFTER [--repeats 2]

* ``dlm train`` AR and MDLM ``tiny`` (built-in Shakespeare, BPE 4,096, sequences of 128,
  batch 32, 12 steps logged every 3; steady state: the median of the windows after the
  first), tokens/s;
* samples/s of the AR sampler (KV cache), masked ancestral and Fast-dLLM at 128 tokens,
  batch 1 and 16, from the first tiny run each commit trained (a run folder of the newer code
  holds config keys the older one does not read).

Writes ``before_after.json`` beside this file.
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
        _, nfe, seconds = generate(run, batch, 128, settings=s, seed=1)
        out[f"{sampler}@{batch}"] = {"samples_per_s": batch / seconds, "network_calls": nfe}
print(json.dumps(out))
"""


def run(src: Path, argv: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def train_rate(src: Path, family: str, out: Path) -> float:
    run(src, ["-m", "dlm", "train", "--family", family, "--size", "tiny", *DATA, "--steps", "12", "--seed", "0",
              "--out", str(out), "--quiet", "train.log_every=3"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows[1:] if "tokens_per_s" in r)


def extract(commit: str, dest: Path) -> Path:
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "src"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def main() -> None:
    before, after = sys.argv[1], sys.argv[2]
    repeats = int(sys.argv[sys.argv.index("--repeats") + 1]) if "--repeats" in sys.argv else 2
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
                    rate = train_rate(src, family, work / f"{which}-{family}-{rep}")
                    rows.setdefault(f"train {family} tiny", {}).setdefault(which, []).append(rate)
                    print(f"[{rep}] train {family} {which:6s} {rate:8,.0f} tokens/s  load {load:.1f}", flush=True)
            for family, samplers in (("ar", "ancestral"), ("mdlm", "ancestral,fast-dllm")):
                for which, src in srcs.items():
                    folder = work / f"{which}-{family}-0"  # each code samples from its own run (config keys differ)
                    out = json.loads(run(src, ["-c", SAMPLE, str(folder), samplers]).strip().splitlines()[-1])
                    for key, v in out.items():
                        rows.setdefault(f"sample {family} {key}", {}).setdefault(which, []).append(v["samples_per_s"])
                        print(f"[{rep}] sample {family} {key:16s} {which:6s} {v['samples_per_s']:8.2f} samples/s",
                              flush=True)
    table = {k: {w: statistics.median(v) for w, v in r.items()} | {"runs": r} for k, r in rows.items()}
    result = {"command": "nice -n 5 python benchmarks/speed/before_after.py " + " ".join(sys.argv[1:]),
              "before": before, "after": after, "date": time.strftime("%Y-%m-%d %H:%M"), "rows": table,
              "loadavg_end": os.getloadavg()[0]}
    (HERE / "before_after.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
