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
        if kind == "gen":
            for k in ("gen_ppl", "entropy", "seconds_per_sample", "nfe", "steps"):
                out[f"{k}@{at}"] = r[k]
        elif kind == "speed":
            for k, v in r.items():
                if k.startswith(("batches_per_s", "tokens_per_s", "seconds_per_batch", "network_steps")):
                    out[f"{k}@{at}"] = v
        elif kind == "infill" and "accuracy" in r:
            out[f"infill_accuracy@{at}"] = r["accuracy"]
        elif kind == "epoch":
            out[f"bits_per_token@epoch{at}"] = r["bits_per_token"]
    return {k: v for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


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


def build_results(spec, units, per_run: dict, command: str, wall_s: float) -> dict:
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
    lines += _table(["model", "family", "kind", "bits/token", "NLL", "PPL", "bits/byte", "batches/s (batch 4)",
                     "s per sample (batch 1)", "training tokens/s"], rows)
    lines += ["", "How each likelihood was measured: " + "; ".join(f"{n}: {r['likelihood_kind']}" for n, r in models.items())
              + "."]
    lines += ["", "Standard error of bits per token within a run (text and Monte Carlo noise), mean over seeds: "
              + ", ".join(f"{n} {fmt(r['aggregate'].get('stderr_bits_per_token'))}" for n, r in models.items()) + "."]
    return lines


def _samples(results: dict) -> list[str]:
    """Gen PPL, entropy and seconds per sample at every sampling budget."""
    models, s = results["models"], results["settings"]
    lines = ["", "## Samples: quality against sampling steps", "",
             f"{s['samples']} unconditional samples per row, Gen PPL under `{_judge(models)}` (lower is better; only "
             "comparable within this report), unigram entropy in nats (low = repetitive) and the sampling seconds per "
             "sample (batches of up to 16).", ""]
    rows = []
    for name, r in models.items():
        a = r["aggregate"]
        for steps in s["sample_steps"]:
            if f"gen_ppl@{steps}" in a:
                rows.append([name, f"{a[f'steps@{steps}']['mean']:.0f}", fmt(a.get(f"gen_ppl@{steps}"), 1),
                             fmt(a.get(f"entropy@{steps}"), 2), fmt(a.get(f"seconds_per_sample@{steps}"), 3)])
    return lines + _table(["model", "steps", "Gen PPL", "entropy", "s per sample"], rows)


def _speed(results: dict) -> list[str]:
    """Sampling speed at every timed budget and batch size."""
    models, s, sh, m = results["models"], results["settings"], results["shared"], results["machine"]
    columns = speed_columns(s["speed_batches"])
    lines = ["", "## Sampling speed", "",
             f"Unconditional samples of {sh['seq_len']} tokens: the mean of {s['speed_repeats']} timed draws after a "
             f"warm-up, {m['threads']} torch threads; the load average before each measurement is in results.json.", ""]
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


def _infill(results: dict) -> list[str]:
    """Masked-token completion accuracy at every span length."""
    models, s = results["models"], results["settings"]
    lines = ["", "## Masked-token completion", "",
             f"Accuracy of greedy (temperature 0) completion of a held-out span in the middle of {s['infill_rows']} "
             "validation sequences. Diffusion models see **both sides** of the span; the autoregressive model sees "
             "**only the left side** (the prefix) and generates the span after it.", ""]
    rows = [[name, r["infill_context"] or "—"] + [fmt(r["aggregate"].get(f"infill_accuracy@{n}")) for n in s["infill_lengths"]]
            for name, r in models.items()]
    return lines + _table(["model", "context"] + [f"span {n}" for n in s["infill_lengths"]], rows)


def _stability(results: dict) -> list[str]:
    """The range over seeds of each model's main figures."""
    models, top = results["models"], results["settings"]["sample_steps"][-1]
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
    lines += ["", "Run folders are under `runs/` (`dlm eval runs/NAME`, `dlm sample runs/NAME`); every figure is in "
              "`results.json`.", ""]
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
