"""How the uniform-state bound's Monte Carlo estimate spreads with uniform and with
log-uniform-mixture time draws (`eval.log_t_share`, `dlm eval --log-t-share`).

For each trained run folder given: the Monte Carlo part of `dlm eval`'s bound (∫ from 1e-5 to
1, `DiffusionFamily.nll`; the bounded tail below 1e-5 is deterministic and left out) in bits
per token over the same `--rows` validation blocks, `--mc-samples` draws of t per block,
repeated `--repeats` times with fresh draws, for each share. Reported per share: the mean and
standard deviation of those repeated estimates (the spread a user sees between two `dlm eval
--seed` runs of the same size), and the median. Every share estimates the same integral (the
importance weights keep the expectation), so a lower spread is the whole difference.

    python benchmarks/sddlm/time_draws.py RUN [RUN …] [--shares 0,0.1,0.25] [--repeats 32]

The runs measured for docs/uniform.md were `benchmarks/sddlm/small_vocab.py`'s (V = 18 and the
BPE-4,096 contrast) and two runs of `dlm bench compare` (BPE 1,024, 250 steps). Writes
benchmarks/sddlm/time_draws.json (merged by run folder) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent


@torch.no_grad()
def measure(run_dir: Path, shares: list[float], rows: int, mc_samples: int, repeats: int, seed: int) -> dict:
    from dlm.batch import Batch
    from dlm.data import prepare_data
    from dlm.families.diffusion import DiffusionFamily
    from dlm.runs import load_run

    run = load_run(run_dir, "cpu")
    fam, model = run.family, run.model.eval()
    blocks, _ = prepare_data(run.cfg.data, run.tokenizer).rows("val", run.cfg.data.seq_len)
    pick = np.linspace(0, len(blocks) - 1, min(rows, len(blocks))).round().astype(int)
    batch = Batch(torch.from_numpy(blocks[pick].astype(np.int64)))
    tokens = batch.x0.numel()
    out = {"run": str(run_dir), "family": run.cfg.family, "objective": run.cfg.objective.name,
           "vocab_size": fam.vocab_size, "seq_len": run.cfg.data.seq_len, "rows": len(pick), "shares": {}}
    for share in shares:
        run.cfg.eval.log_t_share = share
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        bits = [float(DiffusionFamily.nll(fam, model, batch, gen, mc_samples).sum()) / tokens / math.log(2)
                for _ in range(repeats)]
        out["shares"][str(share)] = {"mean_bits": float(np.mean(bits)), "sd_bits": float(np.std(bits, ddof=1)),
                                     "median_bits": float(np.median(bits)), "seconds": time.perf_counter() - t0}
        print(f"{run_dir} share {share}: {out['shares'][str(share)]}", flush=True)
    return out


def main() -> None:
    from dlm.bench.report import machine

    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--shares", default="0,0.1,0.25")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--mc-samples", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "time_draws.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shares = [float(s) for s in args.shares.split(",")]
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    results.update({"command": "python " + " ".join(sys.argv), "machine": machine(), "date": time.strftime("%Y-%m-%d"),
                    "rows": args.rows, "mc_samples": args.mc_samples, "repeats": args.repeats})
    for run_dir in args.runs:
        results["runs"][run_dir] = measure(Path(run_dir), shares, args.rows, args.mc_samples, args.repeats, args.seed)
        out.write_text(json.dumps(results, indent=1) + "\n")
    print("| run | V | " + " | ".join(f"share {s}: mean ± sd (median)" for s in shares) + " |")
    print("|---|---|" + "---|" * len(shares))
    for run_dir, r in results["runs"].items():
        cells = [f"{r['shares'][str(s)]['mean_bits']:.3f} ± {r['shares'][str(s)]['sd_bits']:.3f} "
                 f"({r['shares'][str(s)]['median_bits']:.3f})" if str(s) in r["shares"] else "" for s in shares]
        print(f"| {Path(run_dir).name} ({r['objective']}) | {r['vocab_size']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
