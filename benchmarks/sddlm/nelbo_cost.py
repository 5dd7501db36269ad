"""What the uniform-state NELBO costs: the integrand (forward, forward + backward) and the
tail ∫_0^ε that `dlm eval` adds (two network passes) next to its K Monte Carlo passes.

    OMP_NUM_THREADS=1 python benchmarks/sddlm/nelbo_cost.py

Untrained tiny models (2×128, time-conditioned) on random tokens, best of 3; writes
benchmarks/sddlm/nelbo_cost.json (docs/uniform.md quotes it). Timings on a shared machine are
indicative only; the ratios are the point.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from dlm.batch import Batch
from dlm.config import ComponentConfig, RunConfig
from dlm.families import FAMILIES
from dlm.families.diffusion import DiffusionFamily

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
from foundation import machine  # noqa: E402


def best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(min(times), 3)


def main() -> None:
    out = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    gen = torch.Generator().manual_seed(0)
    for V, N, rows in ((4096, 4096, 32), (50257, 256, 16)):
        fam = FAMILIES.get("usdm")(RunConfig(family="usdm", objective=ComponentConfig("nelbo", {})), V, 0)
        logits = torch.randn(N, V, generator=gen) * 3
        x0 = torch.randint(0, V, (N,), generator=gen)
        xt = torch.where(torch.rand(N, generator=gen) < 0.5, x0, torch.randint(0, V, (N,), generator=gen))
        t = torch.rand(N, generator=gen) * 0.999 + 1e-3

        def forward(grad: bool):
            x = logits.clone().requires_grad_(grad)
            f = fam.bound.per_position(x, x0, xt, t, fam.process)
            if grad:
                f.sum().backward()

        model = fam.build_model().eval()
        torch.nn.init.normal_(model.head.weight, std=0.3)
        batch = Batch(torch.randint(0, V, (rows, 128), generator=gen))
        with torch.no_grad():
            mc = best(lambda: DiffusionFamily.nll(fam, model, batch, torch.Generator().manual_seed(1), 4))
            tail = best(lambda: fam.tail(model, batch, torch.Generator().manual_seed(1)))
        out[f"V={V}"] = {"positions": N, "integrand_forward_s": best(lambda: forward(False)),
                         "integrand_forward_backward_s": best(lambda: forward(True)),
                         "eval_rows": rows, "eval_mc4_s": mc, "eval_tail_s": tail,
                         "tail_over_mc4": round(tail / mc, 3)}
    (HERE / "nelbo_cost.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
