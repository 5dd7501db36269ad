"""Peak memory of one training step of ``small`` (12 × 768) at the GPT-2 vocabulary (V = 50,257,
the layer padded to 50,304 rows) with the fused output layer + loss (``train.fused_head=true``,
the default) against the plain one (``false``), AR and MDLM, sequences of 1,024.

    nice -n 5 python benchmarks/speed/fused_memory.py [--batch 2] [--families ar,mdlm] [--repeats 1]

Each measurement is ``dlm train … --steps 1`` in a fresh process (``OMP_NUM_THREADS=2``); its
peak is the process's high-water resident set, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
(torch's CPU allocations do not pass through tracemalloc, so it could not see them). The step
holds the weights, their gradients, AdamW's two moments and the EMA: the same in both
variants, so the difference is the output layer's and the loss's. Plain and fused alternate.
Writes ``fused_memory.json`` beside this file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD = """
import json, resource, sys
from dlm.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def option(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def main() -> None:
    batch, repeats = int(option("--batch", "2")), int(option("--repeats", "1"))
    families = option("--families", "ar,mdlm").split(",")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="dlm-fm-") as d:
        for rep in range(repeats):
            for family in families:
                for fused in ("false", "true"):
                    out = Path(d) / f"{family}-{fused}-{rep}"
                    argv = ["train", "--family", family, "--size", "small", "--data", "shakespeare", "--tokenizer",
                            "gpt2", "--seq-len", "1024", "--batch-size", str(batch), "--steps", "1", "--seed", "0",
                            "--out", str(out), "--quiet", f"train.fused_head={fused}"]
                    load, t0 = os.getloadavg()[0], time.perf_counter()
                    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, env=env)
                    if proc.returncode != 0:
                        raise SystemExit(proc.stderr[-2000:])
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1]).get("loss")
                    rows.append({"family": family, "fused_head": fused == "true", "batch": batch, "repeat": rep,
                                 "peak_rss_mb": round(r["peak_rss_mb"]), "loss": loss, "loadavg": load,
                                 "wall_s": round(time.perf_counter() - t0, 1), "command": "dlm " + " ".join(argv)})
                    print(json.dumps(rows[-1]), flush=True)
                    (HERE / "fused_memory.json").write_text(json.dumps(
                        {"command": "python benchmarks/speed/fused_memory.py " + " ".join(sys.argv[1:]),
                         "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
