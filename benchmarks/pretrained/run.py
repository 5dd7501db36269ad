"""SmolLM2-135M as dlm's starting point (``benchmarks/pretrained/README.md``): on the built-in
corpus, the same validation tokens for the three SmolLM2 rows, this CPU —

* ``ar-0``: the model as it is (``--family ar --steps 0``): exact NLL;
* ``ar-N``: after N steps of continued training (exact);
* ``mdlm-N``: adapted to masked diffusion (``--family mdlm --init-from smollm2-135m``:
  bidirectional, [MASK] added, Dream's shifted logits) after the same N steps (NELBO bound);
* ``quickstart``: the README's main command's model (``--config quickstart``, MDLM tiny from
  scratch, BPE 4,096), reused from --work when it has finished;
* ``sft``: the next-speaker task (``shakespeare-next-speaker``) fine-tuned from ``mdlm-N``.

Each row: bits per byte on held-out plays, Gen PPL and entropy of unconditional samples under
the default judge (SmolLM2-135M itself: see the README), a few samples kept. Streams run side by
side, one torch thread per process; results.json is rewritten after every measurement.

    nice -n 5 python benchmarks/pretrained/run.py                     # the recorded run (README)
    python benchmarks/pretrained/run.py --steps 1 --sft-steps 1 --samples 2 --sample-steps 4 \\
        --eval-tokens 256 --answers 4 --work /tmp/pt-smoke --out /tmp/pt-smoke/results.json   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).parent
TASK = "shakespeare-next-speaker"
LOCK = threading.Lock()
RESULTS: dict = {}


def dlm(*args: str) -> str:
    """``python -m dlm ARGS`` with one torch thread; its stdout (one line and exit on failure)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "dlm", *args], capture_output=True, text=True, env=env)
    print(f"[{time.strftime('%H:%M:%S')}] {time.time() - t0:7.1f} s  dlm {' '.join(args)}  -> {proc.returncode}",
          flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dlm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def record(row: str, key: str, value, args) -> None:
    """results[rows][row][key] = value, then results.json rewritten (a late stop keeps figures)."""
    with LOCK:
        RESULTS.setdefault("rows", {}).setdefault(row, {})[key] = value
        RESULTS["load_average"].append([time.strftime("%H:%M:%S", time.gmtime()), *os.getloadavg()])
        RESULTS["elapsed_s"] = round(time.time() - RESULTS["_t0"], 1)
        Path(args.out).write_text(json.dumps({k: v for k, v in RESULTS.items() if k != "_t0"}, indent=1) + "\n")


def finished(run: Path, steps: int) -> bool:
    latest = run / "checkpoints" / "latest"
    return latest.is_file() and latest.read_text().strip() == f"step_{steps:08d}"


def last_metrics(run: Path) -> dict:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def train(run: Path, steps: int, args, *flags: str) -> None:
    if finished(run, steps):
        return
    if run.exists():
        raise RuntimeError(f"{run} exists but did not finish {steps} steps: remove it")
    dlm("train", *flags, "--steps", str(steps), "--out", str(run), "--seed", "0", "--quiet", "train.time_budget_s=0",
        "train.log_every=1", *args)


def untrained_ar(run: Path, args) -> str:
    """The unchanged model as an ar run: ``--steps 0``; before that existed, one step at lr 1e-12
    (an AdamW update of ~1e-12 leaves float32 weights of ~1e-2 unchanged)."""
    common = ["--init-from", "smollm2-135m", "--family", "ar", "--batch-size", str(args.batch), "--seq-len",
              str(args.seq_len)]
    try:
        train(run, 0, [], *common)
        return "--steps 0"
    except RuntimeError as e:
        print(f"--steps 0 refused, falling back to one step at lr 1e-12: {e}", flush=True)
        train(run, 1, ["train.lr=1e-12", "train.warmup_steps=0", "train.ema_decay=0"], *common)
        return "--steps 1 train.lr=1e-12"


def likelihood(row: str, run: Path, args, *extra: str) -> None:
    key = "eval" + ("_all" if extra == ("--max-tokens", "0") else "")
    cached = Path(args.work) / f"{row}-{key}.json"  # made by an earlier invocation: reused
    if not cached.is_file():
        cached.write_text(dlm("eval", str(run), "--json", "--max-tokens", str(args.eval_tokens), "--mc-samples",
                              str(args.mc_samples), "--seed", "0", *extra))
    record(row, key, json.loads(cached.read_text()), args)


def samples(row: str, run: Path, args, steps: int, key: str = "samples") -> None:
    out = Path(args.work) / f"{row}-{key}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    subprocess.run([sys.executable, __file__, "--measure", str(run), str(out), str(steps), str(args.samples),
                    str(args.top_p)], check=True, env=env)
    print(f"[{time.strftime('%H:%M:%S')}] {time.time() - t0:7.1f} s  samples {row} @{steps}", flush=True)
    record(row, key, json.loads(out.read_text()), args)


def measure(run: str, out: str, steps: str, num: str, top_p: str) -> None:
    """(a subprocess) ``num`` unconditional samples of the training length at ``steps`` steps,
    their Gen PPL and entropy under the default judge, and their texts."""
    import torch

    from dlm.judge import load_judge
    from dlm.runs import load_run
    from dlm.service import generate, sampler_settings, score_samples

    torch.set_num_threads(1)
    r = load_run(run, device="cpu")
    settings = sampler_settings(r, steps=int(steps), top_p=float(top_p))
    judge = load_judge(None, torch.device("cpu"))
    tokens, nfe, seconds = generate(r, int(num), r.cfg.data.seq_len, None, settings, seed=0, batch=int(num))
    q = score_samples(judge, tokens.numpy(), r.tokenizer)
    texts = [r.tokenizer.decode([t for t in row if t != r.tokenizer.eos_id]) for row in tokens.tolist()]
    Path(out).write_text(json.dumps({"steps": int(steps), "samples": int(num), "top_p": float(top_p), "nfe": nfe,
                                     "sample_seconds": seconds, **q, "texts": texts}, indent=1))


def reference(run: str, out: str, num: str) -> None:
    """(a subprocess) Gen PPL and entropy of ``num`` held-out blocks of the training length (evenly
    spread over the val split, tokenised as ``run``'s), scored exactly like samples."""
    import torch

    from dlm.data import prepare_data
    from dlm.evaluate import select_rows
    from dlm.judge import load_judge
    from dlm.runs import load_run
    from dlm.service import score_samples

    torch.set_num_threads(1)
    r = load_run(run, device="cpu")
    rows, _ = prepare_data(r.cfg.data, r.tokenizer).rows("val", r.cfg.data.seq_len)
    keep = select_rows(rows, int(num) * r.cfg.data.seq_len)
    q = score_samples(load_judge(None, torch.device("cpu")), rows[keep], r.tokenizer)
    Path(out).write_text(json.dumps({"blocks": len(keep), **q}, indent=1))


def stream_reference(args) -> None:
    w = Path(args.work)
    for row, run in (("ar-0", w / "ar-0"), ("quickstart", w / "quickstart")):
        out = w / f"{row}-reference.json"
        if not out.is_file():  # made by an earlier invocation: reused
            subprocess.run([sys.executable, __file__, "--reference", str(run), str(out), str(args.samples)], check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        record("held-out text", f"{row}_tokens", json.loads(out.read_text()), args)


def stream_ar(args) -> None:
    w = Path(args.work)
    how = untrained_ar(w / "ar-0", args)
    record("ar-0", "made_with", how, args)
    likelihood("ar-0", w / "ar-0", args)
    samples("ar-0", w / "ar-0", args, args.seq_len)
    train(w / f"ar-{args.steps}", args.steps, args.train_overrides, *pretrained_flags("ar", args))
    record(f"ar-{args.steps}", "train", last_metrics(w / f"ar-{args.steps}"), args)
    likelihood(f"ar-{args.steps}", w / f"ar-{args.steps}", args)
    samples(f"ar-{args.steps}", w / f"ar-{args.steps}", args, args.seq_len)


def pretrained_flags(family: str, args) -> list[str]:
    flags = ["--init-from", "smollm2-135m", "--family", family, "--batch-size", str(args.batch), "--seq-len",
             str(args.seq_len)]
    return flags + (["--objective", "nelbo-count"] if family == "mdlm" else [])


def stream_mdlm0(args) -> None:
    """The adapted model before any training step (bidirectional, [MASK] at the mean embedding,
    shifted logits): what the N steps start from. No samples (their cost)."""
    run = Path(args.work) / "mdlm-0"
    train(run, 0, [], *pretrained_flags("mdlm", args))
    likelihood("mdlm-0", run, args)


def stream_mdlm(args) -> None:
    w = Path(args.work)
    run = w / f"mdlm-{args.steps}"
    train(run, args.steps, args.train_overrides, *pretrained_flags("mdlm", args))
    record(run.name, "train", last_metrics(run), args)
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(lambda: (likelihood(run.name, run, args), samples(run.name, run, args, args.sample_steps))),
                pool.submit(stream_sft, run, args)]
        for j in jobs:
            j.result()


def stream_sft(base: Path, args) -> None:
    sft = Path(args.work) / f"sft-{args.sft_steps}"
    train(sft, args.sft_steps, ["--batch-size", str(args.sft_batch), *args.train_overrides],
          "--init-from", str(base), "--data", TASK)
    record("sft", "train", last_metrics(sft), args)
    ev = json.loads(dlm("eval", str(sft), "--answers", str(args.answers), "--steps", str(args.answer_steps),
                        "--sample-batch", str(args.answers), "--max-tokens", str(args.sft_eval_tokens),
                        "--mc-samples", "2", "--seed", "0", "--json"))
    from dlm.data.tasks import speaker_baselines

    record("sft", "eval", ev, args)
    record("sft", "baselines", speaker_baselines(limit=args.answers), args)


def stream_quickstart(args) -> None:
    run = Path(args.work) / "quickstart"
    train(run, 1800, [], "--config", "quickstart")
    record("quickstart", "train", last_metrics(run), args)
    likelihood("quickstart", run, args)
    likelihood("quickstart", run, args, "--max-tokens", "0")
    samples("quickstart", run, args, args.sample_steps)
    samples("quickstart", run, args, 128, key="samples_128")


def table(results: dict) -> str:
    """The README's table from results.json (``--report``)."""
    lines = ["| row | training | val bits/byte | scored | Gen PPL | entropy | sampler steps (NFE) | sampling s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in results["rows"].items():
        if name.startswith("_") or name in ("sft", "held-out text"):
            continue
        for key, sample_key in (("eval", "samples"), ("eval_all", "samples_128")):
            ev, sm = row.get(key), row.get(sample_key, {})
            if ev is None and not sm:
                continue
            kind = "" if ev is None else ("bound" if ev["bound"] else "exact")
            bpb = "—" if ev is None else f"{ev['bits_per_byte']:.3f} ± {ev['stderr_bits_per_byte']:.3f} ({kind})"
            scored = "—" if ev is None else f"{ev['tokens']:,} tokens, {ev['bytes']:,} bytes"
            steps = (row.get("train") or {}).get("step", 0)
            gen = f"{sm['gen_ppl']:.1f} | {sm['entropy']:.2f} | {sm['steps']} ({sm['nfe']}) | {sm['sample_seconds']:.0f}" \
                if sm else "— | — | — | —"
            lines.append(f"| {name} | {steps} steps | {bpb} | {scored} | {gen} |")
    for key, ref in results["rows"].get("held-out text", {}).items():
        lines.append(f"| held-out text ({ref['blocks']} blocks, {key.replace('_', ' ')}) | — | — | — | "
                     f"{ref['gen_ppl']:.1f} | {ref['entropy']:.2f} | — | — |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        return measure(*sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "--report":
        return print(table(json.loads((HERE / "results.json").read_text())))
    if len(sys.argv) > 1 and sys.argv[1] == "--reference":
        return reference(*sys.argv[2:])
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/dlm-bench-pretrained")
    p.add_argument("--out", default=str(HERE / "results.json"))
    p.add_argument("--steps", type=int, default=16, help="N: training steps of ar-N and mdlm-N")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--eval-tokens", type=int, default=4096, help="validation tokens (SmolLM2 tokens for its rows)")
    p.add_argument("--mc-samples", type=int, default=2)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--sample-steps", type=int, default=32, help="diffusion sampler steps (AR: one call per token)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass for every row (the quickstart's)")
    p.add_argument("--sft-steps", type=int, default=16)
    p.add_argument("--sft-batch", type=int, default=8)
    p.add_argument("--answers", type=int, default=32)
    p.add_argument("--answer-steps", type=int, default=8)
    p.add_argument("--sft-eval-tokens", type=int, default=2048)
    p.add_argument("--only", default="ar,mdlm,mdlm0,quickstart,reference", help="streams to run")
    args = p.parse_args()
    args.train_overrides = [f"train.lr={args.lr}", f"train.warmup_steps={args.warmup}", "train.ema_decay=0"]
    Path(args.work).mkdir(parents=True, exist_ok=True)
    from dlm.bench.report import machine

    out = Path(args.out)
    if out.is_file():  # keep the rows of an earlier (partial) run of the same folder
        RESULTS.update(json.loads(out.read_text()))
    RESULTS["commands"] = RESULTS.get("commands", []) + [" ".join(["python", *sys.argv])]
    RESULTS.update({"machine": machine(), "settings": {
        k: v for k, v in vars(args).items() if k not in ("work", "out")}, "_t0": time.time(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    RESULTS["load_average"] = RESULTS.get("load_average", []) + [[time.strftime("%H:%M:%S", time.gmtime()),
                                                                   *os.getloadavg()]]
    streams = {"ar": stream_ar, "mdlm": stream_mdlm, "quickstart": stream_quickstart, "mdlm0": stream_mdlm0, "reference": stream_reference}
    wanted = args.only.split(",")
    with ThreadPoolExecutor(len(wanted)) as pool:
        jobs = {name: pool.submit(streams[name], args) for name in wanted}
    for name, job in jobs.items():
        if job.exception() is not None:
            print(f"stream {name} failed: {job.exception()}", flush=True)
            record("_errors", name, str(job.exception()), args)
    record("_done", "at", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), args)


if __name__ == "__main__":
    main()
