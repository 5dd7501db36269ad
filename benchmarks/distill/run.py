"""Few-step students against their teacher and AR: Gen PPL and entropy under the judge against
wall time, 128 tokens, batch 1 and 16 (``benchmarks/distill/README.md``).

    nice -n 5 python benchmarks/distill/run.py                  # ~30-40 min on 2 shared CPU cores
    python benchmarks/distill/run.py --teacher-steps 20 --ar-steps 20 --steps-per-round 5 --rounds 2 \\
        --samples-b1 2 --teacher-grid 8,16 --work /tmp/dd-smoke --out /tmp/dd-smoke/results.json   # smoke

Trains (or reuses, when already finished in --work) a tiny MDLM teacher and a tiny AR model with
the same data, tokenizer and budget, distils the teacher with SDTT (``dlm distill``: start_steps
→ start_steps / 2^rounds, one round-end checkpoint per student), optionally a USDM teacher with
DCD (--usdm), then draws --samples unconditional samples of 128 tokens from each model at
batch 1 and at batch 16 in one process with one torch thread, scores them with the default
judge (SmolLM2-135M) and writes results.json, a plot and a Markdown table.
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

import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent
COMMON = ["--size", "tiny", "--seq-len", "128", "--batch-size", "16", "--seed", "0", "--quiet"]
# --data markov2: compare-source's settings (src/dlm/configs/compare-source.yaml), samples judged exactly by the source
SOURCE_COMMON = ["--size", "tiny", "--data", "markov2", "--tokenizer", "char", "--seq-len", "64", "--batch-size", "16",
                 "--seed", "0", "--quiet", "train.lr=3e-3", "train.warmup_steps=25", "sampler.top_p=1.0"]


def common(args) -> list[str]:
    return COMMON if args.data is None else SOURCE_COMMON


def dlm(*commands: list[str]) -> None:
    """``python -m dlm`` for each command, all at once, one torch thread each (on shared cores two
    threads per process wait on each other: benchmarks/samplers/README.md)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [(c, subprocess.Popen([sys.executable, "-m", "dlm", *c], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env)) for c in commands]
    for c, proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"dlm {' '.join(c)} failed:\n{err[-2000:]}")
        print(out.strip(), flush=True)


def finished(run: Path, steps: int) -> bool:
    latest = run / "checkpoints" / "latest"
    return latest.is_file() and latest.read_text().strip() == f"step_{steps:08d}"


def known_runs(args) -> dict[str, Path]:
    w = Path(args.work)
    return {name: w / name for name in ("mdlm", "sdtt", "ar", *(("usdm", "dcd") if args.usdm else ()))}


def train_models(args) -> dict[str, Path]:
    w = Path(args.work)
    runs = {"ar": w / "ar"}
    teachers = [("mdlm", "sdtt")] + ([("usdm", "dcd")] if args.usdm else [])
    runs.update({t: w / t for t, _ in teachers} | {s: w / s for _, s in teachers})
    dlm(*(["train", "--family", t, "--steps", str(args.teacher_steps), "--out", str(runs[t]), *common(args)]
          for t, _ in teachers if not finished(runs[t], args.teacher_steps)))
    k = args.steps_per_round
    ar = ["train", "--family", "ar", "--steps", str(args.ar_steps), "--out", str(runs["ar"]), *common(args)]
    dlm(*([ar] if not finished(runs["ar"], args.ar_steps) else []),  # AR trains while the students distil
        *(["distill", str(runs[t]), "--out", str(runs[s]), "--quiet", "--rounds", str(args.rounds), "--steps-per-round",
           str(k), "--start-steps", str(args.start_steps), f"train.lr={args.lr}", "train.warmup_steps=0",
           f"train.ckpt_every={k}", f"train.keep_checkpoints={args.rounds}"] for t, s in teachers
          if not finished(runs[s], k * args.rounds)))
    return runs


def measure(run, settings, judge, samples: int, batch: int) -> dict:
    from dlm.service import generate, score_samples

    generate(run, 1, run.cfg.data.seq_len, None, settings, seed=123, batch=1)  # warm-up, untimed
    load1 = os.getloadavg()[0]
    t0 = time.process_time()
    tokens, nfe, seconds = generate(run, samples, run.cfg.data.seq_len, None, settings, seed=0, batch=batch)
    cpu = time.process_time() - t0
    q = score_samples(judge, tokens.numpy(), run.tokenizer)
    row = {"batch": batch, "samples": samples, "seconds": seconds, "cpu_s": cpu, "s_per_sample": seconds / samples,
           "cpu_per_sample": cpu / samples,
           "tokens_per_s": samples * tokens.shape[1] / seconds, "nfe": nfe, "gen_ppl": q["gen_ppl"],
           "entropy": q["entropy"], "load1_before": load1}
    if hasattr(judge, "source"):
        row.update(source_figures(judge, tokens.numpy(), run.tokenizer))
    return row


def source_figures(judge, tokens, tokenizer) -> dict:
    """The samples' exact bits per token under the source, its standard error over the samples
    (each sample a cluster: the ratio estimator's delta method) and the share of likely transitions."""
    from dlm.evaluate import sample_documents

    docs = sample_documents(tokens, tokenizer)
    nll, count = judge.score(docs)
    bits = nll / math.log(2)
    r = bits.sum() / count.sum()
    stderr = math.sqrt(((bits - r * count) ** 2).sum() / (len(docs) * (len(docs) - 1))) / count.mean()
    f = judge.figures(docs)
    return {"source_bits": f["source_bits_per_token"], "source_bits_stderr": stderr,
            "source_likely": f["source_likely_share"], "source_tokens": f["source_tokens"]}


def points(args, runs) -> list[tuple[str, str, Path, int, Path | None]]:
    """(label, model, run folder, steps, student weights or None): AR, the students, then the
    teachers' step grids (the longest part last)."""
    out = [("ar (KV cache)", "ar", runs["ar"], 128 if args.data is None else 64, None)]  # one step per token
    k = args.steps_per_round
    for teacher, student in (("mdlm", "sdtt"), ("usdm", "dcd")):
        if student in runs:
            out += [(f"student {student}{args.label_suffix}", student, runs[student], args.start_steps // 2**r,
                     runs[student] / "checkpoints" / f"step_{r * k:08d}" / "model.safetensors")
                    for r in range(1, args.rounds + 1)]
    for teacher in ("mdlm", "usdm"):
        if teacher in runs:
            grid = getattr(args, f"{teacher}_grid") or args.teacher_grid
            out += [(f"teacher {teacher}", teacher, runs[teacher], s, None) for s in grid]
    return out


def measure_all(args, runs, save) -> list[dict]:
    from dlm.checkpoint import load_weights
    from dlm.runs import load_run
    from dlm.service import sampler_settings

    judge = choose_judge(args)
    rows, loaded = [], {}
    wanted = tuple(args.models.split(","))
    for label, model, folder, steps, weights in points(args, runs):
        if not label.startswith(wanted):
            continue
        if folder not in loaded:
            loaded[folder] = load_run(folder, device="cpu")
        run = loaded[folder]
        if weights is not None:
            load_weights(run.model, load_file(weights), folder)
        settings = sampler_settings(run, steps=steps)
        for batch, samples in ((1, args.samples_b1), (16, 16 * args.batches_b16)):
            row = {"label": label, "model": model, "steps": steps, **measure(run, settings, judge, samples, batch)}
            rows.append(row)
            save(rows)  # after every row: a run cut short keeps what it measured
            print(json.dumps(row), flush=True)
    return rows


def choose_judge(args):
    """The default judge (SmolLM2-135M) on text, the source itself on --data markov2."""
    from dlm.data.sources import SourceJudge, source_of
    from dlm.judge import load_judge

    return load_judge(None, torch.device("cpu")) if args.data is None else SourceJudge(source_of(args.data))


def n_samples(row: dict) -> int:
    return row.get("samples", 16 if row["batch"] == 16 else 8)  # rows of the first recorded run lack it


def plot(rows: list[dict], path: Path, source: dict | None = None) -> None:
    """Gen PPL (on a synthetic source: the samples' exact bits per token, with the source's
    entropy rate) against wall seconds (top) and CPU seconds (bottom) per sample, batch 1 and 16."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality = "source_bits" if source else "gen_ppl"
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey=True)
    for i, (key, what) in enumerate((("s_per_sample", "wall"), ("cpu_per_sample", "CPU"))):
        for ax, batch in zip(axes[i], (1, 16)):
            for label in dict.fromkeys(r["label"] for r in rows):
                pts = sorted((r["cpu_s"] / n_samples(r) if key == "cpu_per_sample" else r[key], r[quality], r["steps"])
                             for r in rows
                             if r["label"] == label and r["batch"] == batch)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
                for x, y, n in pts:
                    if not label.startswith("ar"):
                        ax.annotate(str(n), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            if source:
                ax.axhline(source["entropy_rate_bits"], color="k", ls=":", lw=1, label="source entropy rate")
            ax.set_xscale("log")
            ax.set_yscale("linear" if source else "log")
            length = source["seq_len"] if source else 128
            ax.set_xlabel(f"{what} seconds per {length}-token sample" + (" (batch time / 16)" if batch > 1 else ""))
            ax.set_title(f"batch {batch}, {what} time")
            ax.grid(alpha=0.3)
        axes[i][0].set_ylabel("bits per token under the source (exact)" if source else "Gen PPL (SmolLM2-135M)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(rows: list[dict]) -> str:
    exact = all("source_bits" in r for r in rows)
    quality = "bits/token (source) | likely |" if exact else "Gen PPL | entropy |"
    lines = [f"| model | steps | batch | {quality} wall s / sample | CPU s / sample | tokens/s (wall) | NFE |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n = n_samples(r)
        q = (f"{r['source_bits']:.2f} ± {r['source_bits_stderr']:.2f} | {r['source_likely']:.2f}" if exact else
             f"{r['gen_ppl']:.0f} | {r['entropy']:.2f}")
        lines.append(f"| {r['label']} | {r['steps']} | {r['batch']} | {q} | "
                     f"{r['s_per_sample']:.3f} | {r['cpu_s'] / n:.3f} | {r['tokens_per_s']:.0f} | {r['nfe']} |")
    return "\n".join(lines)


def pooled(rows: list[dict]) -> str:
    """Per model and step count, the samples of batch 1 and 16 together (the same sampler): exact
    bits per token (standard error from each batch's), beside the CPU seconds per sample at each batch."""
    lines = ["| model | steps | samples | bits/token (source) | likely | CPU s / sample, batch 1 | batch 16 |",
             "|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["label"], r["steps"]) for r in rows):
        group = {r["batch"]: r for r in rows if (r["label"], r["steps"]) == key}
        n = {b: r["source_tokens"] for b, r in group.items()}
        total = sum(n.values())
        bits = sum(r["source_bits"] * n[b] for b, r in group.items()) / total
        se = math.sqrt(sum((r["source_bits_stderr"] * n[b]) ** 2 for b, r in group.items())) / total
        likely = sum(r["source_likely"] * n[b] for b, r in group.items()) / total
        cpu = [f"{group[b]['cpu_s'] / n_samples(group[b]):.4f}" if b in group else "—" for b in (1, 16)]
        lines.append(f"| {key[0]} | {key[1]} | {sum(n_samples(r) for r in group.values())} | {bits:.2f} ± {se:.2f} | "
                     f"{likely:.2f} | {cpu[0]} | {cpu[1]} |")
    return "\n".join(lines)


def source_reference(args) -> dict | None:
    """The source's exact figures (bits per token): its entropy rate, the expected figure of a
    block of the sample length seen without its past, and its own samples' (and its unigram's
    and first-order chain's) bits under it, as the measurement scores samples."""
    from dlm.data.sources import SourceJudge, source_of

    if args.data is None:
        return None
    source, L = source_of(args.data), 64
    refs = {str(k): SourceJudge(source).figures(source.reference_samples(k, 256, L)) for k in range(source.order + 1)}
    return {"name": source.name, "seq_len": L, "entropy_rate_bits": source.entropy_rate / math.log(2),
            "block_bits": source.block_entropy(L) / math.log(2), "likely_share": source.likely_share,
            "reference_samples": refs}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/dlm-bench-distill")
    p.add_argument("--out", default=str(HERE / "results.json"))
    p.add_argument("--teacher-steps", type=int, default=500)
    p.add_argument("--ar-steps", type=int, default=500)
    p.add_argument("--start-steps", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps-per-round", type=int, default=80)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--samples-b1", type=int, default=8, help="samples drawn one at a time")
    p.add_argument("--batches-b16", type=int, default=1, help="batches of 16 samples drawn at batch 16")
    p.add_argument("--data", choices=("markov2",), help="compare-source's synthetic source instead of Shakespeare "
                   "(sequences of 64, char tokenizer; samples judged exactly by the source)")
    p.add_argument("--teacher-grid", default="4,8,16,32,64,128,256,512,1024")
    p.add_argument("--label-suffix", default="", help="after the students' labels (a second distillation's rows)")
    p.add_argument("--mdlm-grid", help="the MDLM teacher's steps (default: --teacher-grid)")
    p.add_argument("--usdm-grid", help="the USDM teacher's steps (default: --teacher-grid)")
    p.add_argument("--usdm", action="store_true", help="also a USDM teacher and its DCD students")
    p.add_argument("--report", action="store_true", help="only the plot and table of the results*.json beside --out")
    p.add_argument("--no-train", action="store_true", help="measure the runs in --work as they are")
    p.add_argument("--models", default="ar,student,teacher", help="which labels to measure (prefixes)")
    args = p.parse_args()
    args.teacher_grid, args.mdlm_grid, args.usdm_grid = ([int(s) for s in g.split(",")] if g else None
                                                         for g in (args.teacher_grid, args.mdlm_grid, args.usdm_grid))
    if args.report:
        rows = [r for f in sorted(Path(args.out).parent.glob("results*.json")) for r in json.loads(f.read_text())["rows"]]
        plot(rows, Path(args.out).with_name("quality_vs_time.png"), source_reference(args))
        print(table(rows))
        if args.data is not None:
            print("\n" + pooled(rows))
        return
    torch.set_num_threads(1)
    t0 = time.time()
    runs = train_models(args) if not args.no_train else known_runs(args)
    trained_s = time.time() - t0
    from dlm.bench.report import machine

    out = Path(args.out)
    source = source_reference(args)

    def save(rows):
        trained = {name: json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])["elapsed_s"]
                   for name, folder in runs.items()}
        out.write_text(json.dumps({"command": " ".join(sys.argv), "machine": machine(), "train_s": trained_s,
                                   "train_elapsed_s": trained, "source": source, "uptime": uptime(),
                                   "total_s": time.time() - t0, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                   "rows": rows}, indent=1))

    rows = measure_all(args, runs, save)
    plot(rows, out.with_name("quality_vs_time.png"), source)
    print(table(rows))


if __name__ == "__main__":
    main()
