"""The SDDLM paper's ablation, small: uniform-state diffusion trained with `naive`, `nelbo`,
`sddlm`, `sddlm-v1` and `sddlm-v2`, and MDLM as a reference, with the same backbone, data
and number of steps; then, for each model, the NELBO on held-out text (one bound for all
uniform-state models), Gen PPL under the default judge and sample entropy at a few step
counts, and the training time per step.

    python benchmarks/sddlm/run.py                 # ~1 hour on 2 CPU cores
    python benchmarks/sddlm/run.py --steps 50 --samples 4 --sample-steps 8 --work /tmp/b   # smoke

Runs go to --work (default runs/bench-sddlm; a finished run is reused, so the evaluation
can be redone without training again). Writes benchmarks/sddlm/results.json and prints a
Markdown table. Everything else is the shipped quickstart config (built-in Shakespeare,
BPE 4,096, sequences of 128, batch 32, tiny 2×128 backbone, lr 3e-3), sampled without
nucleus filtering (top_p = 1) so that entropy shows what the model really puts mass on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
from foundation import dlm_out as dlm, finished, machine  # noqa: E402

VARIANTS = {  # key: (label, family, objective, extra config overrides)
    "mdlm": ("mdlm (reference)", "mdlm", "nelbo-count", []),
    "naive": ("usdm naive", "usdm", "naive", []),
    "nelbo": ("usdm nelbo", "usdm", "nelbo", []),
    "sddlm": ("usdm sddlm", "usdm", "sddlm", []),
    "sddlm-v1": ("usdm sddlm-v1", "usdm", "sddlm-v1", []),
    "sddlm-v2": ("usdm sddlm-v2", "usdm", "sddlm-v2", []),
    # not in the paper: the cross-entropy over every resampled position (docs/uniform.md)
    "sddlm-noised": ("usdm sddlm, where=noised", "usdm", "sddlm", ["objective.where=noised"]),
}
DEFAULT = ["mdlm", "naive", "nelbo", "sddlm", "sddlm-v1", "sddlm-v2"]


def train(run: Path, family: str, objective: str, extra: list[str], steps: int, seed: int) -> dict:
    if not finished(run, steps):
        if run.exists():
            dlm("train", "--out", str(run), "--resume", "--steps", str(steps), "--quiet")
        else:
            dlm("train", "--config", "quickstart", "--family", family, "--objective", objective, "--steps", str(steps),
                "--seed", str(seed), "--out", str(run), "--quiet", "train.time_budget_s=0", "train.log_every=50", *extra)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = 32 * 128
    rates = [r["tokens_per_s"] for r in rows if r["step"] > 100 and "tokens_per_s" in r]
    return {
        "steps": rows[-1]["step"],
        "final_loss": rows[-1].get("loss"),
        "s_per_step": round(tokens_per_step / statistics.median(rates), 4) if rates else None,
        "train_tokens_per_s": round(statistics.median(rates)) if rates else None,
    }


def throughput(key: str, tmp: Path, steps: int = 80) -> dict:
    """Seconds per training step (forward + backward + AdamW + EMA) on a quiet machine: the
    median of 20-step windows after the first 20 steps, in a short run of its own."""
    _, family, objective, extra = VARIANTS[key]
    run = tmp / f"tp-{key}"
    dlm("train", "--config", "quickstart", "--family", family, "--objective", objective, "--steps", str(steps),
        "--out", str(run), "--quiet", "train.time_budget_s=0", "train.log_every=20", *extra)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rate = statistics.median(r["tokens_per_s"] for r in rows if r["step"] > 20)
    return {"s_per_step": round(32 * 128 / rate, 4), "train_tokens_per_s": round(rate)}


def reference_quality(run: Path, samples: int) -> dict:
    """Gen PPL and entropy of real held-out text, cut into blocks exactly like the samples:
    the floor a model's samples are measured against."""
    from dlm.data import prepare_data
    from dlm.evaluate import generative_perplexity, sample_documents, sample_entropy, select_blocks
    from dlm.judge import load_judge
    from dlm.runs import load_run

    loaded = load_run(run, "cpu")
    L = loaded.cfg.data.seq_len
    blocks = select_blocks(prepare_data(loaded.cfg.data, loaded.tokenizer).val, L, samples * L)
    out = generative_perplexity(load_judge(None, "cpu"), sample_documents(blocks, loaded.tokenizer))
    out.update(sample_entropy(blocks, loaded.tokenizer.eos_id))
    return {"blocks": len(blocks), **{k: out[k] for k in ("gen_ppl", "judge_nll", "judge_tokens", "entropy", "entropy_std")}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--sample-steps", default="16,64,256")
    ap.add_argument("--mc-samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/bench-sddlm")
    ap.add_argument("--throughput", action="store_true",
                    help="only measure seconds per step of the variants (run it on an otherwise idle machine)")
    ap.add_argument("--only", help=f"comma-separated variants to (re)run, merged into the results "
                    f"(default: {','.join(DEFAULT)}; also: {','.join(k for k in VARIANTS if k not in DEFAULT)})")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    step_counts = [int(s) for s in args.sample_steps.split(",")]
    out = HERE / "results.json"
    keys = args.only.split(",") if args.only else DEFAULT
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r} (choose from {', '.join(VARIANTS)})")
    results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "steps": args.steps,
                     "samples": args.samples, "sample_steps": step_counts, "mc_samples": args.mc_samples,
                     "command": " ".join(sys.argv), "models": []}
    if (args.only or args.throughput) and out.is_file():  # add to / replace in the recorded results
        results = json.loads(out.read_text())
        results.setdefault("commands", [results.get("command")]).append(" ".join(sys.argv))
    if args.throughput:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            results["throughput"] = {key: throughput(key, Path(d)) for key in keys}
        out.write_text(json.dumps(results, indent=1))
        print(json.dumps(results["throughput"], indent=1))
        return
    for key in keys:
        label, family, objective, extra = VARIANTS[key]
        run = work / key
        t0 = time.perf_counter()
        row = {"key": key, "label": label, "family": family, "objective": objective, "overrides": extra,
               **train(run, family, objective, extra, args.steps, args.seed)}
        row["train_wall_s"] = round(time.perf_counter() - t0, 1)
        ev = json.loads(dlm("eval", str(run), "--json", "--mc-samples", str(args.mc_samples), "--seed", "0"))
        row.update({k: ev[k] for k in ("nll", "ppl", "stderr", "bits_per_byte", "stderr_bits_per_byte", "tokens")})
        row["quality"] = []
        for steps in step_counts:
            q = json.loads(dlm("eval", str(run), "--json", "--no-likelihood", "--samples", str(args.samples),
                               "--steps", str(steps), "--top-p", "1.0", "--seed", "0"))
            row["quality"].append({"steps": steps, **{k: q[k] for k in ("gen_ppl", "judge_nll", "judge_tokens", "entropy",
                                                                     "entropy_std", "sample_tokens_per_s")}})
        results["models"] = [m for m in results["models"] if m.get("label") != label] + [row]
        out.write_text(json.dumps(results, indent=1))  # after every model: a crash loses nothing finished
        print(f"{label}: {json.dumps(row)}", flush=True)
    if "held_out_text" not in results:
        results["held_out_text"] = reference_quality(work / keys[0], args.samples)
        out.write_text(json.dumps(results, indent=1))
    print_table(results)
    print(f"\nwritten to {out}")


def print_table(results: dict) -> None:
    steps = results["sample_steps"]
    head = "| model | NELBO ppl (val) | bits/byte | s/step | " + " | ".join(f"Gen PPL / entropy @{s}" for s in steps) + " |"
    print(head + "\n" + "|---" * (4 + len(steps)) + "|")
    by_label = {v[0]: k for k, v in VARIANTS.items()}
    for r in results["models"]:
        tp = results.get("throughput", {}).get(r.get("key") or by_label.get(r["label"]), {})
        r_s = tp.get("s_per_step", r["s_per_step"])
        q = " | ".join(f"{x['gen_ppl']:.1f} / {x['entropy']:.2f}" for x in r["quality"])
        print(f"| {r['label']} | {r['ppl']:.1f} ± {r['ppl'] * r['stderr']:.1f} | {r['bits_per_byte']:.3f} | "
              f"{r_s} | {q} |")
    if "held_out_text" in results:
        h = results["held_out_text"]
        print(f"| held-out text ({h['blocks']} blocks) | — | — | — | "
              + " | ".join(f"{h['gen_ppl']:.1f} / {h['entropy']:.2f}" for _ in steps) + " |")


if __name__ == "__main__":
    main()
