"""MDLM vs AR after the same instruction fine-tuning budget, on the built-in
``shakespeare-next-speaker`` task (who speaks next, from the two speeches before the turn).

For each family: pretrain with the shipped quickstart config (built-in Shakespeare, BPE
4,096, sequences of 128, batch 32, tiny 2×128 backbone), fine-tune that run on
``--data shakespeare-next-speaker`` for the same number of steps and batch, then
``dlm eval RUN --answers N --json``: greedy answers to the first N val prompts (exact match
of the speaker line, token accuracy) and the conditional likelihood of the val responses.
Beside them, the task's chance-level references on the same N prompts: "the speaker two
turns back" and "the most frequent speaker" (``dlm.data.tasks.speaker_baselines``).

    python benchmarks/sft/run.py                                    # the recorded run (see README.md)
    python benchmarks/sft/run.py --pretrain-steps 20 --sft-steps 10 --answers 20 --work /tmp/sft-smoke   # smoke

The two families run side by side (``--parallel``, default), each one process with one
thread, so that a machine shared with other work gives both the same share; timings are
then per process under that sharing. Runs go to --work (default /tmp/dlm-bench-sft); a
finished run is reused. Writes benchmarks/sft/results.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
from foundation import dlm_out as dlm, finished, machine  # noqa: E402

FAMILIES = {"mdlm": "nelbo-count", "ar": "ce"}  # the quickstart's objective for MDLM; AR has one
TASK = "shakespeare-next-speaker"


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def pipeline(family: str, args, work: Path, threads: int | None) -> dict:
    """Pretrain, fine-tune and evaluate one family; returns its row of the table."""
    base, sft = work / f"{family}-base", work / f"{family}-sft"
    t0 = time.perf_counter()
    if not finished(base, args.pretrain_steps):
        if base.exists():
            raise SystemExit(f"{base} exists but did not finish {args.pretrain_steps} steps: remove it")
        dlm("train", "--config", "quickstart", "--family", family, "--objective", FAMILIES[family],
            "--steps", str(args.pretrain_steps), "--seed", str(args.seed), "--out", str(base), "--quiet",
            "train.time_budget_s=0", threads=threads)
    pre_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not finished(sft, args.sft_steps):
        if sft.exists():
            raise SystemExit(f"{sft} exists but did not finish {args.sft_steps} steps: remove it")
        dlm("train", "--init-from", str(base), "--data", TASK, "--out", str(sft), "--steps", str(args.sft_steps),
            "--batch-size", str(args.sft_batch), "--seed", str(args.seed), "--quiet", "train.time_budget_s=0",
            f"train.warmup_steps={args.sft_warmup}", "train.log_every=10", threads=threads)
    sft_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev = json.loads(dlm("eval", str(sft), "--answers", str(args.answers), "--sample-batch", str(args.answer_batch),
                        "--seed", "0", "--json", threads=threads))
    eval_wall = time.perf_counter() - t0
    pre, tune = metrics(base), metrics(sft)
    keep = ("answers", "answer_exact_match", "answer_exact_match_stderr", "answer_token_accuracy",
            "answer_token_accuracy_stderr", "answer_target_tokens", "answer_steps", "answer_nfe", "answer_seconds",
            "answer_examples", "nll", "stderr", "ppl", "bits_per_token", "tokens", "sequences", "bound",
            "conditional", "mc_samples")
    return {
        "family": family,
        "objective": FAMILIES[family],
        "pretrain_steps": pre[-1]["step"],
        "pretrain_loss": pre[-1]["loss"],
        "pretrain_elapsed_s": round(pre[-1]["elapsed_s"], 1),
        "pretrain_wall_s": round(pre_wall, 1),
        "sft_steps": tune[-1]["step"],
        "sft_loss": tune[-1]["loss"],
        "sft_elapsed_s": round(tune[-1]["elapsed_s"], 1),  # the trainer's own clock (training loop only)
        "sft_wall_s": round(sft_wall, 1),  # the whole command: data, tokenisation, training, checkpoint
        "eval_wall_s": round(eval_wall, 1),
        **{k: ev[k] for k in keep if k in ev},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--sft-batch", type=int, default=32)
    ap.add_argument("--sft-warmup", type=int, default=15)
    ap.add_argument("--answers", type=int, default=400)
    ap.add_argument("--answer-batch", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/dlm-bench-sft")
    ap.add_argument("--sequential", action="store_true", help="one family after the other, default threads")
    args = ap.parse_args()
    os.environ.setdefault("DLM_CACHE", "/tmp/dlm-bench-cache")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.sequential:
        rows = [pipeline(f, args, work, None) for f in FAMILIES]
    else:
        with ThreadPoolExecutor(len(FAMILIES)) as pool:
            rows = list(pool.map(lambda f: pipeline(f, args, work, 1), FAMILIES))

    from dlm.data.tasks import TRAIN_CAP, VAL_CAP, speaker_baselines

    results = {
        "machine": {**machine(), "load_average_at_end": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "dlm_cache": os.environ["DLM_CACHE"],
        "task": TASK,
        "task_rows": {"train": TRAIN_CAP, "val": VAL_CAP},
        "settings": {k: v for k, v in vars(args).items() if k != "work"},
        "parallel": not args.sequential,
        "models": rows,
        "baselines": speaker_baselines(limit=args.answers),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    out = HERE / "results.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print_table(results)
    print(f"\nwritten to {out}")


def print_table(results: dict) -> None:
    n = results["baselines"]["pairs"]
    print(f"| model | exact match ({n} val prompts) | token accuracy | conditional NLL (nats/token) | "
          "SFT wall time |\n|---|---|---|---|---|")
    for r in results["models"]:
        kind = "bound" if r["bound"] else "exact"
        print(f"| {r['family']} ({r['pretrain_steps']} + {r['sft_steps']} steps) | "
              f"{r['answer_exact_match']:.3f} ± {r['answer_exact_match_stderr']:.3f} | "
              f"{r['answer_token_accuracy']:.3f} ± {r['answer_token_accuracy_stderr']:.3f} | "
              f"{r['nll']:.3f} ± {r['stderr']:.3f} ({kind}) | {r['sft_wall_s']:.0f} s |")
    b = results["baselines"]
    print(f"| two turns back | {b['two_turns_back']:.3f} | — | — | — |")
    print(f"| most frequent train speaker ({b['most_frequent_train_speaker']}) | {b['most_frequent_train']:.3f} | — | — | — |")
    print(f"| most frequent val speaker ({b['most_frequent_val_speaker']}, oracle) | {b['most_frequent_val']:.3f} | — | — | — |")


if __name__ == "__main__":
    main()
