"""The comparison's results: every per-run figure, their spread over seeds (mean, standard
deviation, min–max), and the Markdown report with the thesis's table shape."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from dlm import __version__
from dlm.fsio import atomic_write_text


def machine() -> dict:
    """The CPU, cores, torch version and threads, GPU and Python a benchmark ran with."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def flat_figures(parts: dict) -> dict:
    """One run's measurements as flat ``figure[@setting]: number`` pairs."""
    out = dict(parts.get("train", {}))
    lik = parts.get("likelihood", {})
    for k in ("nll", "ppl", "bits_per_token", "bits_per_byte", "stderr", "stderr_bits_per_token", "stderr_bits_per_byte",
              "unigram_bits_per_byte"):
        if k in lik:
            out[k] = lik[k]
    for key, r in parts.items():
        kind, _, at = key.partition("@")
        if kind == "gen" or kind.startswith("gen:"):
            suffix = at + kind[3:].replace(":", "/", 1)  # gen:self-correct@8 → …@8/self-correct
            for k in ("gen_ppl", "entropy", "seconds_per_sample", "nfe", "steps", *SOURCE_FIGURES):
                if k in r:
                    out[f"{k}@{suffix}"] = r[k]
        elif kind == "speed":
            for k, v in r.items():
                if k.startswith(("batches_per_s", "tokens_per_s", "seconds_per_batch", "network_steps")):
                    out[f"{k}@{at}"] = v
        elif kind == "infill" and "accuracy" in r:
            out[f"infill_accuracy@{at}"] = r["accuracy"]
        elif kind == "epoch":
            out[f"bits_per_token@epoch{at}"] = r["bits_per_token"]
    return {k: v for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


SOURCE_FIGURES = ("source_bits_per_token", "source_likely_share")  # samples judged by a synthetic source


def samplers_of(results: dict) -> list[str | None]:
    """The samplers measured: None (each run's own) and those of ``compare.samplers``."""
    return [None, *results["settings"].get("samplers", [])]


def at_key(steps: int, sampler: str | None) -> str:
    return f"{steps}" + (f"/{sampler}" if sampler else "")


def likelihood_kind(lik: dict) -> str:
    """How a run's likelihood was measured, in words."""
    if not lik["bound"]:
        return "exact NLL"
    words = f"upper bound (NELBO), {lik['mc_samples']} Monte Carlo draw{'s' if lik['mc_samples'] > 1 else ''} per sequence"
    if lik.get("log_t_share"):
        words += f", {lik['log_t_share']:.0%} of them log-uniform in t (importance-weighted)"
    if "time_stride" in lik:
        words += (f", {lik['bound_steps']} of the T = {lik['process_steps']} step terms (every {lik['time_stride']}th: "
                  f"the bound of the {lik['bound_steps']}-step model)")
    return words


def spread(values: list[float]) -> dict:
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(a) == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else None,
            "min": float(a.min()), "max": float(a.max()), "n": int(len(a))}


def build_results(spec, units, per_run: dict, command: str, wall_s: float, out: Path | None = None,
                  baselines: dict | None = None) -> dict:
    models = {}
    for plan in spec.models:
        runs = {u.name: per_run[u.name] for u in units if u.model is plan}
        figures = {name: flat_figures(parts) for name, parts in runs.items()}
        keys = sorted({k for f in figures.values() for k in f})
        infill_context = next((p[k]["context"] for p in runs.values() for k in p if k.startswith("infill@")
                               and "context" in p[k]), None)
        models[plan.name] = {
            "family": plan.cfg.family,
            "overrides": plan.overrides,
            "bound": next(iter(runs.values()))["likelihood"]["bound"],
            "infill_context": infill_context,
            "likelihood_kind": likelihood_kind(next(iter(runs.values()))["likelihood"]),
            "runs": runs,
            "figures": figures,
            "aggregate": {k: spread([f.get(k) for f in figures.values()]) for k in keys},
        }
    base = spec.models[0].cfg
    results = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "dlm_version": __version__,
        "machine": {**machine(), "load1_end": round(os.getloadavg()[0], 2)},
        "wall_s": wall_s,
        "seeds": spec.seeds,
        "settings": spec.settings.__dict__,
        "shared": {"size": base.model.size, "data": base.data.data, "tokenizer": base.data.tokenizer,
                   "seq_len": base.data.seq_len, "steps": base.train.steps, "batch_size": base.train.batch_size,
                   "tokens": base.train.steps * base.train.batch_size * base.train.grad_accum * base.data.seq_len,
                   "unique_tokens": spec.settings.unique_tokens, "epochs": spec.settings.epochs},
        "models": models,
        "out": str(out) if out is not None else None,
        "baselines": baselines or {},
    }
    if spec.mark_steps:
        results["data_constrained"] = data_constrained(results, spec)
    return results


def data_constrained(results: dict, spec) -> dict:
    """Validation bits per token (mean over seeds) at every epoch mark, and where each bounded
    (diffusion) model's curve crosses each exact (AR) one: every pair of marks between which
    the order of the two curves flips."""
    marks = sorted(spec.mark_steps)
    curves = {name: [m["aggregate"].get(f"bits_per_token@epoch{e:g}", {}).get("mean") for e in marks]
              for name, m in results["models"].items()}
    exact = [name for name, m in results["models"].items() if not m["bound"]]
    crossings = []
    for ref in exact:
        for name, curve in curves.items():
            if name == ref:
                continue
            # at each mark, is this model's curve below the reference's? (None: not measured)
            below = [None if a is None or b is None else a < b for a, b in zip(curve, curves[ref])]
            flips = [{"between": [marks[k - 1], marks[k]], "to": "below" if below[k] else "above"}
                     for k in range(1, len(marks)) if None not in (below[k - 1], below[k]) and below[k] != below[k - 1]]
            crossings.append({"model": name, "reference": ref, "starts_below": below[0], "ends_below": below[-1],
                              "crossings": flips})
    return {"epoch_marks": marks, "mark_steps": {f"{e:g}": s for e, s in spec.mark_steps.items()}, "curves": curves,
            "crossings": crossings}


def fmt(s: dict | None, digits: int = 3) -> str:
    """mean ± std [min–max] (one seed: the value alone)."""
    if not s or s.get("mean") is None:
        return "—"
    f = f"{{:.{digits}f}}" if abs(s["mean"]) < 1e4 else "{:,.0f}"
    if s["n"] == 1:
        return f.format(s["mean"])
    return f"{f.format(s['mean'])} ± {f.format(s['std'])} [{f.format(s['min'])}–{f.format(s['max'])}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def write_report(results: dict, plots: list[str], out: Path) -> None:
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str))
    atomic_write_text(out / "report.md", render(results, plots))


def render(results: dict, plots: list[str]) -> str:
    """``report.md``: the set-up, then one section per measurement, every run, the plots."""
    lines = _set_up(results) + _likelihood(results) + _samples(results) + _speed(results) + _infill(results)
    lines += _stability(results)
    if "data_constrained" in results:
        lines += _data_constrained(results)
    lines += _every_run(results)
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _set_up(results: dict) -> list[str]:
    """The command, date, machine, what every model shares and each model's own keys."""
    models, sh, m = results["models"], results["shared"], results["machine"]
    return [
        "# dlm bench compare",
        "",
        f"`{results['command']}`",
        "",
        f"{results['date']} · dlm {results['dlm_version']} · torch {m['torch']} · {m['cuda'] or m['cpu']} "
        f"({m['cores']} cores, {m['threads']} torch threads, load {m['load1_end']} at the end) · "
        f"{results['wall_s'] / 60:.1f} min",
        "",
        f"Every model: `{sh['size']}` backbone, `{sh['data']}` with the `{sh['tokenizer']}` tokenizer, sequences of "
        f"{sh['seq_len']}, {sh['steps']:,} steps of {sh['batch_size']} ({sh['tokens']:,} training tokens)"
        + (f", on the first {sh['unique_tokens']:,} training tokens only ({sh['epochs']:g} epochs)" if sh["unique_tokens"] else "")
        + f"; seeds {', '.join(map(str, results['seeds']))}. Figures are mean ± standard deviation over seeds "
        "[min–max]; one seed shows the value alone.",
        "",
        "Models (their run-config keys on top of the shared ones): "
        + "; ".join(f"`{n}` = " + ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) for n, r in models.items()) + ".",
        "",
    ]


def _likelihood(results: dict) -> list[str]:
    """The thesis's table: bits, NLL, PPL and bits per byte, with sampling and training speed."""
    models, timed = results["models"], results["settings"]["speed_steps"][-1]
    lines = [
        "## Likelihood and speed (the thesis's table)",
        "",
        "Bits per token, NLL (nats per token), perplexity and bits per byte on the same validation tokens for "
        "every model. **bound**: the diffusion families' figures are the NELBO, an upper bound on −log p; "
        "**exact**: the autoregressive model's NLL. Sampling batches/s at batch 4 and the time to one sample "
        f"at batch 1 are at {timed} diffusion steps (AR: one step per token).",
        "",
    ]
    rows = []
    for name, r in models.items():
        a = r["aggregate"]
        rows.append([name, r["family"], "bound" if r["bound"] else "exact", fmt(a.get("bits_per_token")),
                     fmt(a.get("nll")), fmt(a.get("ppl"), 1), fmt(a.get("bits_per_byte")),
                     fmt(_at(a, "batches_per_s_b4", timed), 2), fmt(_at(a, "seconds_per_batch_b1", timed), 3),
                     fmt(a.get("train_tokens_per_s"), 0)])
    rows += floor_rows(results.get("baselines") or {})
    lines += _table(["model", "family", "kind", "bits/token", "NLL", "PPL", "bits/byte", "batches/s (batch 4)",
                     "s per sample (batch 1)", "training tokens/s"], rows)
    lines += floor_notes(results.get("baselines") or {})
    lines += ["", "How each likelihood was measured: " + "; ".join(f"{n}: {r['likelihood_kind']}" for n, r in models.items())
              + "."]
    lines += ["", "Standard error of bits per token within a run (text and Monte Carlo noise), mean over seeds: "
              + ", ".join(f"{n} {fmt(r['aggregate'].get('stderr_bits_per_token'))}" for n, r in models.items()) + "."]
    return lines


def floor_rows(b: dict) -> list[list[str]]:
    """The reference rows of the likelihood table: what the token unigram of the training split
    scores on the same validation tokens, and for a synthetic source the truth."""
    if "unigram_bits_per_token" not in b:
        return []

    def row(name: str, kind: str, bits: float, per_byte: float | None) -> list[str]:
        nats = bits * math.log(2)
        return [f"*{name}*", "—", kind, f"{bits:.3f}", f"{nats:.3f}", f"{math.exp(nats):.1f}",
                f"{per_byte:.3f}" if per_byte is not None else "—", "—", "—", "—"]

    per_byte = b["bytes"] / b["tokens"]  # bytes per token of these validation tokens
    rows = [row("token unigram (floor)", "exact", b["unigram_bits_per_token"], b["unigram_bits_per_byte"])]
    if "source_bits_per_token" in b:
        rows.append(row(f"source {b['source']} on these tokens", "exact", b["source_bits_per_token"],
                        b["source_bits_per_token"] / per_byte))
        rows.append(row(f"source {b['source']}: expected, block of {b.get('seq_len', 'L')}", "truth",
                        b["source_block_bits"], b["source_block_bits"] / per_byte))
        rows.append(row(f"source {b['source']}: entropy rate", "truth", b["source_entropy_rate_bits"],
                        b["source_entropy_rate_bits"] / per_byte))
    return rows


def floor_notes(b: dict) -> list[str]:
    if "unigram_bits_per_token" not in b:
        return []
    lines = ["", f"*Token unigram (floor)*: the training split's token frequencies (add-½) scored on the same "
             f"{b['tokens']:,} validation tokens: a model at this row has learned only which tokens are common."]
    if "source_bits_per_token" in b:
        lines[-1] += (f" The data is the synthetic source `{b['source']}` (`dlm.data.sources`), so the truth is known: "
                      "*on these tokens* is the source's own −log p of the validation blocks, each seen without its "
                      "past as the models see it; *expected, block* is its expectation; *entropy rate* is H, what a "
                      "model conditioned on the whole past would pay per token. No model's exact NLL can be below the "
                      "block figure in expectation; a bound below it is a bug.")
    return lines


def _samples(results: dict) -> list[str]:
    """Gen PPL, entropy and seconds per sample at every sampling budget (and sampler), the exact
    figures where a synthetic source judges them, and a few samples' text."""
    models, s = results["models"], results["settings"]
    source = "source_bits_per_token" in (results.get("baselines") or {})
    lines = ["", "## Samples: quality against sampling steps", "",
             f"{s['samples']} unconditional samples per row, Gen PPL under `{_judge(models)}` (lower is better; only "
             "comparable within this report), unigram entropy in nats (low = repetitive) and the sampling seconds per "
             "sample (batches of up to 16)."]
    header = ["model", "sampler", "steps", "Gen PPL", "entropy", "s per sample"]
    if source:
        b = results["baselines"]
        lines[-1] += (f" **Exact**: bits per token of the samples under the source `{b['source']}` itself, and the share "
                      f"of their transitions that are among a context's likely successors. The source's own samples "
                      f"score {b['source_block_bits']:.3f} bits per token in expectation (entropy rate "
                      f"{b['source_entropy_rate_bits']:.3f}) and {b['source_likely_share']:.3f} likely: above means "
                      "errors, below means samples narrower than the source (too few of its sequences).")
        refs = b.get("source_reference_samples") or {}
        if refs:
            words = {"0": "its unigram", "1": "its first-order chain"}
            lines[-1] += (" For reference, 256 samples of the same length from what a model that learned only part "
                          "of the source would draw: " + "; ".join(
                              f"{words.get(k, f'its order-{k} chain')} {f['source_bits_per_token']:.3f} bits, "
                              f"{f['source_likely_share']:.3f} likely" for k, f in refs.items()) + ".")
        header += ["bits/token under the source", "likely transitions"]
    rows = []
    for name, r in models.items():
        a = r["aggregate"]
        for sampler in samplers_of(results):
            for steps in s["sample_steps"]:
                at = at_key(steps, sampler)
                if f"gen_ppl@{at}" in a:
                    row = [name, sampler or "own", f"{a[f'steps@{at}']['mean']:.0f}", fmt(a.get(f"gen_ppl@{at}"), 1),
                           fmt(a.get(f"entropy@{at}"), 2), fmt(a.get(f"seconds_per_sample@{at}"), 3)]
                    if source:
                        row += [fmt(a.get(f"source_bits_per_token@{at}")), fmt(a.get(f"source_likely_share@{at}"))]
                    rows.append(row)
    return [*lines, "", *_table(header, rows), *_examples(results)]


def _examples(results: dict, per_model: int = 2, chars: int = 120) -> list[str]:
    """The first samples of each model's first seed at the largest budget, cut to ``chars`` characters."""
    top = results["settings"]["sample_steps"][-1]
    lines = ["", f"Samples (seed {results['seeds'][0]}, the largest budget measured, the first {chars} characters; "
             "every sample's opening is in results.json):", ""]
    for name, r in results["models"].items():
        parts = next(iter(r["runs"].values()))
        gens = [parts[k] for k in sorted((k for k in parts if k.startswith("gen@")), key=lambda k: int(k[4:]))
                if int(k[4:]) <= top]
        if not gens:
            continue
        texts = gens[-1].get("examples") or [gens[-1].get("example", "")]
        lines.append(f"- `{name}` ({gens[-1]['steps']} steps):")
        lines += [f"  - `{_one_line(t)[:chars]}`" for t in texts[:per_model]]
    return lines


def _one_line(text: str) -> str:
    return text.replace("\n", "⏎").replace("`", "'")


def _speed(results: dict) -> list[str]:
    """Sampling speed at every timed budget and batch size."""
    models, s, sh, m = results["models"], results["settings"], results["shared"], results["machine"]
    columns = speed_columns(s["speed_batches"])
    lines = ["", "## Sampling speed", "",
             f"Unconditional samples of {sh['seq_len']} tokens, {m['threads']} torch thread(s): per batch size the mean "
             f"seconds of {_draws(results)} after one untimed warm-up draw, in each of {len(results['seeds'])} seed(s)' "
             "runs; the load average before each measurement is in results.json (other work on the machine slows "
             "a draw, never speeds it).", ""]
    rows = []
    for name, r in models.items():
        a = r["aggregate"]
        for steps in s["speed_steps"]:
            keys = [f"{key}_b{b}@{steps}" for b, (key, _) in zip(s["speed_batches"], columns)]
            if keys[0] in a:
                rows.append([name, f"{a[f'network_steps@{steps}']['mean']:.0f}"]
                            + [fmt(a.get(k), 3 if k.startswith("seconds") else 1) for k in keys])
    return lines + _table(["model", "steps"] + [f"{label} (batch {b})" for b, (_, label) in zip(s["speed_batches"], columns)],
                          rows)


def _draws(results: dict) -> str:
    """How many timed draws each speed figure averages, as measured (older caches: the setting)."""
    counts = {v for r in results["models"].values() for parts in r["runs"].values() for k, p in parts.items()
              if k.startswith("speed@") for key, v in p.items() if key.startswith("draws_b")}
    if not counts:
        n = results["settings"]["speed_repeats"]
        return f"{n} timed draw{'s' if n > 1 else ''}"
    lo, hi = min(counts), max(counts)
    return (f"{lo} timed draw{'s' if lo > 1 else ''}" if lo == hi else
            f"{lo}–{hi} timed draws (at least compare.speed_repeats = {results['settings']['speed_repeats']}, more while "
            "they are quick)")


def _infill(results: dict) -> list[str]:
    """Masked-token completion accuracy at every span length."""
    models, s = results["models"], results["settings"]
    lines = ["", "## Masked-token completion", "",
             f"Accuracy of greedy (temperature 0) completion of a held-out span in the middle of {s['infill_rows']} "
             "validation sequences. Diffusion models see **both sides** of the span; the autoregressive model sees "
             "**only the left side** (the prefix) and generates the span after it.", ""]
    rows = [[name, r["infill_context"] or "—"] + [fmt(r["aggregate"].get(f"infill_accuracy@{n}")) for n in s["infill_lengths"]]
            for name, r in models.items()]
    b = results.get("baselines") or {}
    base = b.get("infill") or {}
    if base:
        rows.append([f"*most frequent token ({_one_line(repr(b['most_frequent']))})*", "none"]
                    + [f"{base[str(n)]:.3f}" if str(n) in base else "—" for n in s["infill_lengths"]])
        lines[-2] += (" *Most frequent token*: every span position filled with the training split's most frequent "
                      "token, on the same rows and spans: a model at this row has learned nothing about its context.")
    return lines + _table(["model", "context"] + [f"span {n}" for n in s["infill_lengths"]], rows)


def _stability(results: dict) -> list[str]:
    """The range over seeds of each model's main figures."""
    models, top = results["models"], results["settings"]["sample_steps"][-1]
    if len(results["seeds"]) < 2:
        return ["", "## Stability over seeds", "",
                "One seed: no spread. Every figure above is a single run's and can mislead by as much as the runs of "
                "other seeds would differ; within-run standard errors are in the likelihood section and results.json."]
    lines = ["", "## Stability over seeds", "",
             "Range (max − min) over seeds of each model's main figures: how much one run can mislead.", ""]
    rows = []
    for name, r in models.items():
        a = r["aggregate"]
        rows.append([name] + [_range(a.get(k)) for k in ("bits_per_token", "train_loss", f"gen_ppl@{top}")])
    return lines + _table(["model", "bits/token range", "final training loss range", f"Gen PPL range ({top} steps)"], rows)


def _data_constrained(results: dict) -> list[str]:
    """Validation bits at every epoch mark and where the bounded curves cross the exact ones."""
    models, sh, dc = results["models"], results["shared"], results["data_constrained"]
    lines = ["", "## Data-constrained training", "",
             f"Validation bits per token (mean over seeds) after each number of epochs over the first "
             f"{sh['unique_tokens']:,} training tokens (Prabhudesai et al. 2025, arXiv 2507.15857). A diffusion "
             "figure is an upper bound: below AR's exact figure is conclusive, above it is not.", ""]
    rows = [[name] + [fmt(models[name]["aggregate"].get(f"bits_per_token@epoch{e:g}")) for e in dc["epoch_marks"]]
            for name in models]
    lines += _table(["model"] + [f"{e:g} ep" for e in dc["epoch_marks"]], rows)
    lines += [""]
    for c in dc["crossings"]:
        start = "below" if c["starts_below"] else "above"
        flips = "; ".join(f"crosses {f['to']} between {f['between'][0]:g} and {f['between'][1]:g} epochs"
                          for f in c["crossings"]) or "never crosses"
        lines.append(f"- {c['model']} against {c['reference']}: {start} it after {_epochs(dc['epoch_marks'][0])}; "
                     f"{flips}; {'below' if c['ends_below'] else 'above'} it after {_epochs(dc['epoch_marks'][-1])}.")
    return lines


def _every_run(results: dict) -> list[str]:
    """One row per (model, seed) run: its bits, final loss and training speed."""
    lines = ["", "## Every run", ""]
    rows = []
    for name, r in results["models"].items():
        for run, f in r["figures"].items():
            rows.append([run, f"{f.get('bits_per_token', float('nan')):.4f} ± {f.get('stderr_bits_per_token', float('nan')):.4f}",
                         f"{f.get('bits_per_byte', float('nan')):.4f}", f"{f.get('train_loss', float('nan')):.4f}",
                         f"{f.get('train_tokens_per_s', float('nan')):,.0f}", f"{f.get('train_s', float('nan')):.0f}"])
    lines += _table(["run", "bits/token ± stderr", "bits/byte", "final loss", "training tokens/s", "training s"], rows)
    runs = f"{results['out']}/runs" if results.get("out") else "runs"
    lines += ["", f"Run folders are under `{runs}/` (`dlm eval {runs}/NAME`, `dlm sample {runs}/NAME`); every figure is "
              "in `results.json` beside this report.", ""]
    return lines


def speed_columns(batches: list[int]) -> list[tuple[str, str]]:
    """How each batch size is reported: the smallest as seconds per batch (batch 1: the time to
    one sample), the largest as tokens/s (throughput), those between as batches/s (the thesis's)."""
    return [("seconds_per_batch", "s per batch") if b == min(batches) else
            ("tokens_per_s", "tokens/s") if b == max(batches) else ("batches_per_s", "batches/s") for b in batches]


def _at(a: dict, key: str, steps: int) -> dict | None:
    """``key`` at ``steps`` sampling steps, or at the one measurement of a family measured once (AR)."""
    if f"{key}@{steps}" in a:
        return a[f"{key}@{steps}"]
    found = [v for k, v in a.items() if k.startswith(key + "@")]
    return found[0] if len(found) == 1 else None


def _epochs(e: float) -> str:
    return f"{e:g} epoch" + ("" if e == 1 else "s")


def _range(s: dict | None) -> str:
    if not s or s.get("mean") is None or s["n"] < 2:
        return "—"
    return f"{s['max'] - s['min']:.3f}"


def _judge(models: dict) -> str:
    for r in models.values():
        for parts in r["runs"].values():
            for key, p in parts.items():
                if key.startswith("gen@"):
                    return p["judge"]
    return "—"
