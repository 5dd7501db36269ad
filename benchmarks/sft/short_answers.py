"""Short answers: does SFT learn an answer of a few tokens? ``data.sft_length=batch`` (LLaDA's
per-batch filling, the default) against ``model`` (every row filled to seq_len with scored
end-of-text, dlm's only behaviour before the setting existed), same base, steps and seed.

The task: the prompt ``xkqfz 7 = `` (five random letters, a digit), the response the digit's
name (``seven``: 3–5 characters, then end-of-text); 2,000 train pairs, 200 val pairs with other
prompts. Base: a tiny MDLM on the built-in corpus, characters, sequences of 64; every row of
``model`` holds 45–47 scored end-of-text tokens, a ``batch`` row at most 2 (the difference to
the longest answer of its batch).

    python benchmarks/sft/short_answers.py                 # the recorded run (README.md)
    python benchmarks/sft/short_answers.py --base-steps 20 --sft-steps 10 --answers 20 --work /tmp/sa-smoke
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def dlm(*argv: str) -> str:
    out = subprocess.run([sys.executable, "-m", "dlm", *argv], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"dlm {' '.join(argv)} failed:\n{out.stderr}")
    return out.stdout


DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def pairs_file(path: Path, n: int, seed: int, avoid: set[str] = frozenset()) -> set[str]:
    """``n`` pairs ``"xkqfz 7 = "`` → ``"seven"`` (a random 5-letter prefix, then a digit: the
    answer is the digit's name), none of whose prompts is in ``avoid``; returns the prompts."""
    rng, prompts = random.Random(seed), set()
    while len(prompts) < n:
        p = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5)) + f" {rng.randrange(10)} = "
        if p not in avoid:
            prompts.add(p)
    path.write_text("".join(json.dumps({"prompt": p, "response": DIGITS[int(p[6])]}) + "\n" for p in sorted(prompts)))
    return prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--sft-steps", type=int, default=200)
    ap.add_argument("--answers", type=int, default=200)
    ap.add_argument("--work", default="/tmp/dlm-bench-short-answers")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train_words = pairs_file(work / "train.jsonl", 2000, 0)
    pairs_file(work / "val.jsonl", args.answers, 1, avoid=train_words)
    tiny = ["--size", "tiny", "--seq-len", "64", "--tokenizer", "char", "--seed", "0", "--quiet"]
    base = work / "base"
    if not base.exists():
        dlm("train", "--family", "mdlm", "--out", str(base), "--steps", str(args.base_steps), "--batch-size", "32",
            *tiny, "train.lr=3e-3", "train.warmup_steps=20")
    rows = {}
    for mode in ("model", "batch"):
        sft = work / f"sft-{mode}"
        if not sft.exists():
            dlm("train", "--init-from", str(base), "--data", str(work / "train.jsonl"), "--out", str(sft),
                "--steps", str(args.sft_steps), "--batch-size", "32", "--quiet", "train.lr=2e-3",
                "train.warmup_steps=20", f"data.sft_length={mode}")
        r = json.loads(dlm("eval", str(sft), "--data", str(work / "val.jsonl"), "--split", "train", "--answers",
                           str(args.answers), "--steps", "16", "--no-likelihood", "--json", "--sample-batch", "50"))
        last = json.loads((sft / "metrics.jsonl").read_text().splitlines()[-1])
        rows[mode] = {"exact_match": r["answer_exact_match"], "exact_match_stderr": r["answer_exact_match_stderr"],
                      "token_accuracy": r["answer_token_accuracy"], "final_loss": last["loss"],
                      "sft_train_s": round(last["elapsed_s"], 1), "answers": r["answers"],
                      "examples": r["answer_examples"]}
        print(mode, json.dumps(rows[mode]))
    (HERE / "short_answers.json").write_text(json.dumps({"args": vars(args), "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
