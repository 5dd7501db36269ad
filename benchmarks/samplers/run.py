"""Masked-diffusion samplers against each other and against AR: sample quality for the network
calls (NFE) and the wall time spent, task accuracy against the classifier-free guidance weight,
and sampling speed at batch 1 and 16 (128 tokens) and at batch 1 and 4 (1024 tokens).

    DLM_CACHE=/tmp/dlm-bench-cache nice -n 5 python benchmarks/samplers/run.py    # ~35 min; the recorded run (README.md)
    python benchmarks/samplers/run.py --samples 2 --budgets 4 --thresholds 0.9 --answers 4 --answer-steps 4 \
        --weights 0,1 --short-steps 4 --long-steps 4 --long-batches 1 --work /tmp/s   # smoke (overwrites results.json)

Parts (``--parts``, default all four; each part's rows replace that part's rows in
results.json, so a part can be redone alone):

* ``quality``: on the pretrained MDLM (``--base``), ``--samples`` unconditional samples of
  the model's 128 tokens in one batch from seed 0, for every masked sampler at several
  budgets — ``ancestral`` (per-row cache), ``remdm`` (cap, η = 0.02), ``llada``
  (low_confidence, semi-AR blocks of 32) at ``--budgets`` steps, ``fast-dllm`` (prefix
  cache, blocks of 32, steps = 128 as the ceiling) at ``--thresholds`` — and the AR baseline
  (``--ar``, KV cache) once; Gen PPL under the default judge (SmolLM2-135M) with its
  standard error over samples, sample entropy, NFE and the sampling seconds. The run's own
  sampling settings are kept (temperature 1, top-p 0.9), for every sampler alike. Held-out
  text cut into the same blocks is the floor.
* ``caches``: the same measurement for fast-dllm with cache none / prefix / dual at
  thresholds 0.9 and 0.1 (does the approximate cache cost quality?), with the start of the
  first sample of each, and of ``ancestral`` and ``llada`` at 128 steps.
* ``guidance``: ``dlm eval SFT --no-likelihood --answers N --temperature 0 --steps S
  --sample-batch 50 --seed 0 sampler.guidance=W`` for each ``--weights`` W on the
  fine-tuned MDLM (``--sft``), in a process of its own (torch's default threads), with the
  task's chance-level references on the same prompts. A finished evaluation's JSON in
  ``--work``/guidance is reused.
* ``speed``: tokens/s and NFE of ancestral (cached / uncached), remdm, llada (blocks of 32),
  fast-dllm (threshold 0.9, blocks of 32; cache none / prefix / dual) and AR with its KV
  cache, at 128 tokens (steps 128, batch 1 and 16) and at 1024 tokens (steps
  ``--long-steps``, batches ``--long-batches``; batch > 1 there only for
  ``--long-batch-only``), the latter on models with seq_len 1024 trained for 20 steps only
  (trained into ``--work`` if missing: speed does not depend on training). Unconditional
  samples, seed 0, after one untimed warm-up draw per model; wall seconds and the process's
  CPU seconds (``time.process_time``), the latter less sensitive to other jobs taking the
  cores (a process waiting for a core spends wall time, not CPU time).

Everything but ``guidance`` runs in this one process (no start-up per measurement) with
``--threads`` torch threads (default 1; 0: torch's own, one per core): on cores that other
jobs share, 2 threads make every parallel region wait for a descheduled partner and wall
times swing by 10×. The 1-minute load average is recorded with every timed row; wall times
are only comparable within a run. Writes benchmarks/samplers/results.json, quality_vs_nfe.png
and quality_vs_time.png, and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
from foundation import machine  # noqa: E402

from dlm.config import ComponentConfig  # noqa: E402
from dlm.runs import load_run  # noqa: E402

# label, sampler name, sampler settings (steps added per measurement)
BLOCK = 32
QUALITY_SWEEPS = {
    "ancestral": ("ancestral", {"cache": True}),
    "remdm": ("remdm", {"schedule": "cap", "eta": 0.02}),
    "llada": ("llada", {"remasking": "low_confidence", "block_length": BLOCK}),
}
SPEED = {  # label: (sampler, settings); "ar" is the AR family's own sampler
    "ancestral (cache)": ("ancestral", {"cache": True}),
    "ancestral (no cache)": ("ancestral", {"cache": False}),
    "remdm (cap eta 0.02)": ("remdm", {"schedule": "cap", "eta": 0.02}),
    "llada (blocks of 32)": ("llada", {"remasking": "low_confidence", "block_length": BLOCK}),
    "fast-dllm 0.9 cache none": ("fast-dllm", {"threshold": 0.9, "block_length": BLOCK, "cache": "none"}),
    "fast-dllm 0.9 cache prefix": ("fast-dllm", {"threshold": 0.9, "block_length": BLOCK, "cache": "prefix"}),
    "fast-dllm 0.9 cache dual": ("fast-dllm", {"threshold": 0.9, "block_length": BLOCK, "cache": "dual"}),
    "ar (KV cache)": (None, {}),
}
# at 1024 tokens, batch > 1 only for these (the others cost minutes each on 2 shared cores)
LONG_BATCHED = ("ancestral (cache)", "fast-dllm 0.9 cache dual", "ar (KV cache)")


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def dlm(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dlm", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"dlm {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def settings_for(run, name: str | None, extra: dict, steps: int):
    """The run's sampler settings with ``name`` chosen and ``extra`` and ``steps`` on top (as the CLI does)."""
    own = run.cfg.sampler
    if name is None:  # the AR family's one sampler
        name = own.name
    cls = run.family.samplers.get(name)
    fields = set(cls.Settings.__dataclass_fields__)
    settings = {k: v for k, v in own.settings.items() if k in fields}
    settings.update(extra)
    settings["steps"] = steps
    return run.family.choose_sampler(ComponentConfig(name, settings))


def draw(run, settings, num: int, length: int, seed: int, batch: int | None = None) -> dict:
    """``num`` unconditional samples of ``length`` tokens, ``batch`` at a time, from one
    seeded generator: tokens, seconds, NFE per batch and the sampler's call statistics."""
    batch = batch or num
    gen = torch.Generator().manual_seed(seed)
    made = []
    family = run.family
    original = family.sampler

    def capture(s=None):
        made.append(original(s))
        return made[-1]

    family.sampler = capture  # an instance attribute over the method: see the sampler each call makes
    rows, seconds, cpu, nfe, calls, row_evals = [], 0.0, 0.0, [], 0, 0
    try:
        for start in range(0, num, batch):
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.no_grad():
                tokens, n = family.generate(run.model, min(batch, num - start), length, None, gen, settings)
            seconds += time.perf_counter() - t0
            cpu += time.process_time() - c0
            rows.append(tokens)
            nfe.append(n)
            stats = getattr(made[-1], "stats", None) or {}
            calls += stats.get("calls", n)
            row_evals += stats.get("rows", n * min(batch, num - start))
    finally:
        del family.sampler
    fast = getattr(made[-1], "last_stats", {}) or {}
    out = {"tokens": torch.cat(rows).numpy(), "seconds": seconds, "cpu_seconds": cpu, "nfe": max(nfe), "nfe_mean": sum(nfe) / len(nfe),
           "calls": calls, "row_evals": row_evals, "tokens_per_s": num * length / seconds}
    if "positions" in fast:
        out["window_fraction"] = round(fast["positions"], 3)
    return out


def quality_of(tokens, run, judge) -> dict:
    """Gen PPL (as ``dlm eval``: exp of the judge's total NLL over its total tokens), its
    standard error with samples as clusters (the ratio estimator's delta method: the judge NLL
    of every document of a sample summed), and the sample entropy."""
    from dlm.evaluate import sample_documents, sample_entropy

    docs, owner = [], []
    for i, row in enumerate(tokens):
        pieces = sample_documents(row[None], run.tokenizer)
        docs += pieces
        owner += [i] * len(pieces)
    nll, count = judge.score(docs)
    per_nll = np.bincount(owner, weights=nll, minlength=len(tokens))
    per_n = np.bincount(owner, weights=count, minlength=len(tokens))
    n, mean = len(tokens), float(per_nll.sum() / per_n.sum())
    se = math.sqrt(((per_nll - mean * per_n) ** 2).sum() / (n * (n - 1))) / per_n.mean() if n > 1 else float("nan")
    q = {"gen_ppl": math.exp(mean), "judge_nll": mean, "judge_nll_stderr": se,
         "gen_ppl_1se": [math.exp(mean - se), math.exp(mean + se)], "judge_tokens": int(per_n.sum()),
         "judge_documents": len(docs)}
    q.update(sample_entropy(tokens, run.tokenizer.eos_id))
    return q


def warm_up(run, length: int) -> None:
    settings = settings_for(run, None, {}, 4)
    draw(run, settings, 1, min(length, 16), seed=1)


def part_quality(args) -> dict:
    from dlm.judge import load_judge

    base, ar = load_run(Path(args.base), "cpu"), load_run(Path(args.ar), "cpu")
    judge = load_judge(None, "cpu")
    L = base.cfg.data.seq_len
    warm_up(base, L)
    warm_up(ar, L)
    rows = []

    def measure(label, run, name, extra, steps, **keys):
        s = settings_for(run, name, extra, steps)
        load = load1()
        d = draw(run, s, args.samples, L, args.seed)
        row = {"sampler": label, "steps": steps, **keys, "settings": {k: v for k, v in vars(s).items()},
               "nfe": d["nfe"], "calls": d["calls"], "row_evals": d["row_evals"], "seconds": round(d["seconds"], 2),
               "tokens_per_s": round(d["tokens_per_s"], 1), "load1_before": load, "load1_after": load1(),
               **{k: d[k] for k in ("window_fraction",) if k in d}, **quality_of(d["tokens"], run, judge)}
        rows.append(row)
        print(f"quality {label} steps={steps} {keys or ''}: nfe {row['nfe']}, {row['seconds']} s, "
              f"gen ppl {row['gen_ppl']:.1f}, entropy {row['entropy']:.2f}, load {load}", flush=True)

    for label, (name, extra) in QUALITY_SWEEPS.items():
        for steps in args.budgets:
            measure(label, base, name, extra, steps)
    for th in args.thresholds:
        measure("fast-dllm", base, "fast-dllm", {"threshold": th, "block_length": BLOCK, "cache": "prefix"}, L,
                threshold=th)
    measure("ar", ar, None, {}, L)
    return {"samples": args.samples, "length": L, "seed": args.seed, "base": args.base, "ar": args.ar,
            "sampling": {k: base.cfg.sampler.settings[k] for k in ("temperature", "top_k", "top_p")},
            "rows": rows, "held_out_text": reference_quality(base, judge, args.samples)}


def part_caches(args) -> dict:
    """Does fast-dllm's approximate KV cache cost quality? The quality part's measurement for
    fast-dllm with cache none / prefix / dual at thresholds 0.9 and 0.1 (same samples, seed,
    settings), each with the start of its first sample; and the start of a sample of
    ``ancestral`` and ``llada`` at 128 steps, to read what their entropies mean."""
    from dlm.judge import load_judge

    base = load_run(Path(args.base), "cpu")
    judge = load_judge(None, "cpu")
    L = base.cfg.data.seq_len
    warm_up(base, L)
    rows = []
    plan = [("fast-dllm", {"threshold": th, "block_length": BLOCK, "cache": c}) for th in (0.9, 0.1)
            for c in ("none", "prefix", "dual")]
    plan += [("ancestral", {"cache": True}), ("llada", {"remasking": "low_confidence", "block_length": BLOCK})]
    for name, extra in plan:
        s = settings_for(base, name, extra, L)
        load = load1()
        d = draw(base, s, args.samples, L, args.seed)
        row = {"sampler": name, **extra, "steps": L, "nfe": d["nfe"], "seconds": round(d["seconds"], 2),
               "load1_before": load, **quality_of(d["tokens"], base, judge),
               "example": base.tokenizer.decode(d["tokens"][0].tolist())[:240]}
        rows.append(row)
        print(f"caches {name} {extra}: nfe {row['nfe']}, gen ppl {row['gen_ppl']:.1f}, entropy {row['entropy']:.2f}",
              flush=True)
    return {"samples": args.samples, "length": L, "rows": rows}


def reference_quality(run, judge, samples: int) -> dict:
    """Gen PPL and entropy of held-out text cut into blocks of the model's length, like the samples."""
    from dlm.data import prepare_data
    from dlm.evaluate import select_blocks

    L = run.cfg.data.seq_len
    blocks = select_blocks(prepare_data(run.cfg.data, run.tokenizer).val, L, samples * L)
    return {"blocks": len(blocks), **quality_of(blocks, run, judge)}


def part_guidance(args) -> dict:
    from dlm.data.tasks import speaker_baselines

    folder = Path(args.work) / "guidance"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for w in args.weights:
        cmd = ["eval", args.sft, "--no-likelihood", "--answers", str(args.answers), "--temperature", "0",
               "--steps", str(args.answer_steps), "--sample-batch", "50", "--seed", "0", "--json",
               f"sampler.guidance={w:g}"]
        cached = folder / f"answers{args.answers}-steps{args.answer_steps}-w{w:g}.json"
        load = load1()
        if cached.is_file() and cached.stat().st_size:
            r = json.loads(cached.read_text())
        else:
            r = json.loads(dlm(*cmd))
            cached.write_text(json.dumps(r))
        rows.append({"guidance": w, "command": "dlm " + " ".join(cmd), "load1": load,
                     **{k: r[k] for k in r if k.startswith("answer")}})
        print(f"guidance {w:g}: exact match {r['answer_exact_match']:.4f}, token accuracy "
              f"{r['answer_token_accuracy']:.4f}, {r['answer_seconds']:.0f} s", flush=True)
    return {"run": args.sft, "answers": args.answers, "steps": args.answer_steps, "rows": rows,
            "baselines": speaker_baselines(limit=args.answers)}


def long_models(args) -> dict:
    runs = {}
    for family, objective in (("mdlm", "nelbo-count"), ("ar", "ce")):
        out = Path(args.work) / f"{family}-1024"
        latest = out / "checkpoints" / "latest"
        if not latest.is_file():
            dlm("train", "--config", "quickstart", "--family", family, "--objective", objective, "--seq-len", "1024",
                "--batch-size", "4", "--steps", "20", "--out", str(out), "--quiet", "train.time_budget_s=0")
        runs[family] = str(out)
    return runs


def part_speed(args) -> dict:
    base, ar = load_run(Path(args.base), "cpu"), load_run(Path(args.ar), "cpu")
    longs = long_models(args)
    lbase, lar = load_run(Path(longs["mdlm"]), "cpu"), load_run(Path(longs["ar"]), "cpu")
    rows = []
    plan = [(128, args.short_steps, b, base, ar) for b in (1, 16)] + [(1024, args.long_steps, b, lbase, lar) for b in args.long_batches]
    for length, steps, batch, mrun, arun in plan:
        warm_up(mrun, length)
        warm_up(arun, length)
        for label, (name, extra) in SPEED.items():
            if length == 1024 and batch > 1 and args.long_batch_only and label not in args.long_batch_only:
                continue
            run = arun if name is None else mrun
            s = settings_for(run, name, extra, steps)
            num = 2 * batch if (batch == 1 and length == 128) else batch  # batch 1 at 128: two draws
            load = load1()
            d = draw(run, s, num, length, args.seed, batch=batch)
            row = {"sampler": label, "length": length, "steps": run.family.network_steps(s, length), "batch": batch,
                   "samples": num, "nfe": d["nfe"], "nfe_mean": d["nfe_mean"], "calls": d["calls"],
                   "seconds": round(d["seconds"], 2), "tokens_per_s": round(d["tokens_per_s"], 1),
                   "cpu_seconds": round(d["cpu_seconds"], 2),
                   "tokens_per_cpu_s": round(num * length / d["cpu_seconds"], 1),
                   "load1_before": load, "load1_after": load1(),
                   **{k: d[k] for k in ("window_fraction",) if k in d}}
            rows.append(row)
            print(f"speed {label} L={length} batch={batch}: {row['tokens_per_s']} tokens/s, nfe {row['nfe']}, "
                  f"{row['seconds']} s, load {load}", flush=True)
    return {"rows": rows, "long_models": longs, "long_steps": args.long_steps}


def plots(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = results.get("quality")
    if not q:
        return
    colours = {"ancestral": "C0", "remdm": "C1", "llada": "C2", "fast-dllm": "C3", "ar": "k"}
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for xkey, name, xlabel, ticks in (
            ("nfe", "quality_vs_nfe.png", "network calls per batch (NFE, full-batch equivalents)", (16, 32, 64, 128)),
            ("seconds", "quality_vs_time.png",
             f"seconds for {q['samples']} samples of {q['length']} tokens (batch {q['samples']}, "
             f"{q.get('threads', '?')} thread)", (1, 2, 5, 10, 20, 50, 100))):
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(7, 7.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
        for label, colour in colours.items():
            pts = sorted((r[xkey], r["gen_ppl"], r["entropy"], r.get("threshold", r["steps"]),
                          r.get("gen_ppl_1se", [r["gen_ppl"]] * 2)) for r in q["rows"] if r["sampler"] == label)
            if not pts:
                continue
            xs, ys, es, tags, band = zip(*pts)
            marker = "*" if label == "ar" else "o"
            kw = dict(color=colour, marker=marker, ms=12 if label == "ar" else 6, label=label if label != "fast-dllm"
                      else "fast-dllm (prefix cache; label = threshold)")
            err = [[y - b[0] for y, b in zip(ys, band)], [b[1] - y for y, b in zip(ys, band)]]
            a1.errorbar(xs, ys, yerr=err, ls="-" if len(xs) > 1 else "", capsize=2, **kw)
            a2.plot(xs, es, "-" if len(xs) > 1 else "", **{**kw, "label": None})
            if label in ("fast-dllm", "llada"):
                for x, y, tag in zip(xs, ys, tags):
                    a1.annotate(f"{tag:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color=colour)
        h = q["held_out_text"]
        a1.axhline(h["gen_ppl"], color="grey", ls="--", lw=1, label=f"held-out text ({h['gen_ppl']:.0f})")
        a2.axhline(h["entropy"], color="grey", ls="--", lw=1)
        a1.set_xscale("log")
        a1.set_yscale("log")
        a2.set_xticks(ticks)
        a2.xaxis.set_major_formatter(ScalarFormatter())
        a2.xaxis.set_minor_formatter(NullFormatter())
        a1.set_ylabel("Gen PPL (SmolLM2-135M judge, ±1 s.e.; lower is better)")
        a2.set_ylabel("sample entropy (nats)")
        a2.set_xlabel(xlabel)
        a1.legend(fontsize=8)
        a1.set_title(f"MDLM tiny (300 steps) samplers vs AR: {q['samples']} samples each, top-p "
                     f"{q['sampling']['top_p']:g}", fontsize=9)
        a1.grid(True, which="both", alpha=0.3)
        a2.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(HERE / name, dpi=110)
        plt.close(fig)


def print_tables(results: dict) -> None:
    q = results.get("quality")
    if q:
        print("\n| sampler | steps / threshold | NFE | seconds | Gen PPL (±1 s.e.) | entropy |\n|---|---|---|---|---|---|")
        for r in q["rows"]:
            budget = f"threshold {r['threshold']:g}" if "threshold" in r else str(r["steps"])
            lo, hi = r.get("gen_ppl_1se", [r["gen_ppl"]] * 2)
            print(f"| {r['sampler']} | {budget} | {r['nfe']} | {r['seconds']:.1f} | {r['gen_ppl']:.0f} "
                  f"({lo:.0f}–{hi:.0f}) | {r['entropy']:.2f} |")
        h = q["held_out_text"]
        lo, hi = h.get("gen_ppl_1se", [h["gen_ppl"]] * 2)
        print(f"| held-out text ({h['blocks']} blocks) | — | — | — | {h['gen_ppl']:.0f} ({lo:.0f}–{hi:.0f}) | {h['entropy']:.2f} |")
    g = results.get("guidance")
    if g:
        print("\n| guidance w | exact match | token accuracy | seconds |\n|---|---|---|---|")
        for r in g["rows"]:
            print(f"| {r['guidance']:g} | {r['answer_exact_match']:.3f} ± {r['answer_exact_match_stderr']:.3f} | "
                  f"{r['answer_token_accuracy']:.3f} ± {r['answer_token_accuracy_stderr']:.3f} | {r['answer_seconds']:.0f} |")
    s = results.get("speed")
    if s:
        print("\n| sampler | length | steps | batch | NFE | tokens/s (wall) | tokens per CPU-s | load |\n"
              "|---|---|---|---|---|---|---|---|")
        for r in s["rows"]:
            print(f"| {r['sampler']} | {r['length']} | {r['steps']} | {r['batch']} | {r['nfe']} | "
                  f"{r['tokens_per_s']:,.1f} | {r['tokens_per_cpu_s']:,.1f} | {r['load1_before']} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="quality,caches,guidance,speed")
    ap.add_argument("--base", default="/tmp/dlm-bench-sft/mdlm-base")
    ap.add_argument("--ar", default="/tmp/dlm-bench-sft/ar-base")
    ap.add_argument("--sft", default="/tmp/dlm-bench-sft/mdlm-sft")
    ap.add_argument("--work", default="/tmp/dlm-bench-samplers")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--budgets", default="16,32,64,128")
    ap.add_argument("--thresholds", default="0.9,0.7,0.5,0.3,0.1")
    ap.add_argument("--answers", type=int, default=200)
    ap.add_argument("--answer-steps", type=int, default=32)
    ap.add_argument("--weights", default="0,0.5,1,2")
    ap.add_argument("--short-steps", type=int, default=128, help="steps at 128 tokens in the speed part")
    ap.add_argument("--long-steps", type=int, default=256)
    ap.add_argument("--long-batches", default="1,4")
    ap.add_argument("--long-batch-only", default=",".join(LONG_BATCHED),
                    help="comma-separated SPEED labels measured at 1024 tokens with batch > 1 ('' for all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default, one per core); 1 is far steadier on cores other jobs share")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.budgets = [int(s) for s in args.budgets.split(",")]
    args.thresholds = [float(s) for s in args.thresholds.split(",")]
    args.weights = [float(s) for s in args.weights.split(",")]
    args.long_batches = [int(s) for s in args.long_batches.split(",")]
    args.long_batch_only = [s.strip() for s in args.long_batch_only.split(",") if s.strip()]
    Path(args.work).mkdir(parents=True, exist_ok=True)
    out = HERE / "results.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.setdefault("commands", []).append(" ".join(sys.argv))
    results.update({"machine": machine(), "date": time.strftime("%Y-%m-%d")})
    for part in args.parts.split(","):
        t0 = time.perf_counter()
        start_load = os.getloadavg()
        if part == "quality":
            results["quality"] = part_quality(args)
        elif part == "caches":
            results["caches"] = part_caches(args)
        elif part == "guidance":
            results["guidance"] = part_guidance(args)
        elif part == "speed":
            results["speed"] = part_speed(args)
        else:
            raise SystemExit(f"unknown part {part!r} (quality, caches, guidance, speed)")
        results[part]["wall_s"] = round(time.perf_counter() - t0, 1)
        results[part]["threads"] = torch.get_num_threads()
        results[part]["loadavg_start"] = [round(x, 2) for x in start_load]
        results[part]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        out.write_text(json.dumps(results, indent=1))  # after every part: a crash loses nothing finished
    plots(results)
    print_tables(results)
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
