"""The fused output layer + loss against the plain one on this CPU, in one process: AR and MDLM
at ``tiny`` and ``mini``, V = 4,096, batch 32 × 128, one thread, the loss and its backward
(``Family.loss`` + ``backward``: what the two variants differ in), ``train.fused_head`` true and
false alternating, the median of ``--repeats`` timings each (after one warm-up).

    nice -n 5 python benchmarks/speed/fused_cpu.py [--repeats 5]

Writes ``fused_cpu.json`` beside this file.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def setup(family: str, size: str, fused: bool):
    from dlm.config import RunConfig
    from dlm.families import FAMILIES
    from dlm.schema import ModelConfig

    cls = FAMILIES.get(family)
    cfg = RunConfig(family=family, model=ModelConfig(size=size))
    cfg.train.fused_head = fused
    cls.resolve(cfg)
    fam = cls(cfg, 4096, 0)
    torch.manual_seed(0)
    return fam, fam.build_model().train()


def step_s(fam, model, x0) -> float:
    from dlm.batch import Batch

    t0 = time.perf_counter()
    fam.loss(model, Batch(x0), torch.Generator().manual_seed(1)).nats.sum().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    torch.set_num_threads(1)
    repeats = int(sys.argv[sys.argv.index("--repeats") + 1]) if "--repeats" in sys.argv else 5
    x0 = torch.randint(0, 4096, (32, 128), generator=torch.Generator().manual_seed(0))
    rows = {}
    for size in ("tiny", "mini"):
        for family in ("ar", "mdlm"):
            nets = {fused: setup(family, size, fused) for fused in (False, True)}
            for fused, (fam, model) in nets.items():
                step_s(fam, model, x0)  # warm-up
            times = {False: [], True: []}
            load = os.getloadavg()[0]
            for _ in range(repeats):
                for fused, (fam, model) in nets.items():
                    times[fused].append(step_s(fam, model, x0))
            key = f"{family} {size}"
            rows[key] = {"plain_tokens_per_s": x0.numel() / statistics.median(times[False]),
                         "fused_tokens_per_s": x0.numel() / statistics.median(times[True]),
                         "times_s": {"plain": times[False], "fused": times[True]}, "loadavg": load}
            print(f"{key:10s} plain {rows[key]['plain_tokens_per_s']:8,.0f}  fused {rows[key]['fused_tokens_per_s']:8,.0f}"
                  f" tokens/s (loss + backward)  load {load:.1f}", flush=True)
    (HERE / "fused_cpu.json").write_text(json.dumps({"command": "python benchmarks/speed/fused_cpu.py "
                                                     + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M"),
                                                     "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
