"""The comparison's PNG plots (matplotlib, no display needed): training loss per model and
seed, Gen PPL against sampling time, bits per token with its seed spread, and — in
data-constrained mode — validation bits against epochs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dlm.bench.measures import metrics_rows
from dlm.errors import DlmError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise DlmError("dlm bench compare draws its plots with matplotlib, which is not installed: "
                       "pip install 'dlm[bench]', or pass compare.plots=false") from None

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def require_matplotlib() -> None:
    """Fail with one line before any training when the plots cannot be drawn at the end."""
    _pyplot()


def write_plots(results: dict, units, out: Path) -> list[str]:
    plt = _pyplot()
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(results["models"])}
    written = [_loss(plt, units, colours, out), _gen_ppl(plt, results, colours, out), _bits(plt, results, colours, out)]
    if "data_constrained" in results:
        written.append(_epochs(plt, results, colours, out))
    return [w for w in written if w]


def _save(plt, fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _loss(plt, units, colours, out: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labelled = set()
    for u in units:
        rows = metrics_rows(u.path)
        if not rows:
            continue
        label = None if u.model.name in labelled else u.model.name
        labelled.add(u.model.name)
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color=colours[u.model.name], alpha=0.7,
                lw=1, label=label)
    ax.set(xlabel="step", ylabel="training loss (the objective, nats per scored token)",
           title="Training loss, every seed")
    ax.legend(fontsize=8)
    return _save(plt, fig, out, "training_loss.png")


def _gen_ppl(plt, results, colours, out: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results["models"].items():
        a = r["aggregate"]
        points = []
        for steps in results["settings"]["sample_steps"]:
            if f"gen_ppl@{steps}" in a and a[f"gen_ppl@{steps}"]["mean"] is not None:
                points.append((a[f"seconds_per_sample@{steps}"]["mean"], a[f"gen_ppl@{steps}"]["mean"],
                               a[f"steps@{steps}"]["mean"]))
        if not points:
            continue
        x, y, s = zip(*points)
        ax.plot(x, y, "o-" if len(points) > 1 else "*", ms=6 if len(points) > 1 else 12, color=colours[name], label=name)
        for xi, yi, si in zip(x, y, s):
            ax.annotate(f"{si:.0f}", (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="sampling seconds per sample (batches of up to 16)",
           ylabel="Gen PPL (lower is better)", title="Sample quality against sampling time (labels: steps)")
    ax.legend(fontsize=8)
    return _save(plt, fig, out, "gen_ppl_vs_time.png")


def _bits(plt, results, colours, out: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(results["models"])
    for i, name in enumerate(names):
        r = results["models"][name]
        values = [f["bits_per_token"] for f in r["figures"].values() if "bits_per_token" in f]
        if not values:
            continue
        ax.bar(i, np.mean(values), color=colours[name], alpha=0.5, hatch="//" if r["bound"] else None,
               yerr=np.std(values, ddof=1) if len(values) > 1 else None, capsize=4)
        ax.scatter([i] * len(values), values, color="k", s=12, zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set(ylabel="validation bits per token", title="Bits per token: mean, ± std and each seed (hatched: upper bound)")
    return _save(plt, fig, out, "bits_per_token.png")


def _epochs(plt, results, colours, out: Path) -> str:
    dc = results["data_constrained"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results["models"].items():
        means, stds = [], []
        for e in dc["epoch_marks"]:
            s = r["aggregate"].get(f"bits_per_token@epoch{e:g}") or {}
            means.append(s.get("mean") if s.get("mean") is not None else np.nan)
            stds.append(s.get("std") or 0.0)
        m, sd = np.array(means, dtype=float), np.array(stds, dtype=float)
        ax.plot(dc["epoch_marks"], m, marker="o", color=colours[name], label=name, ls="--" if r["bound"] else "-")
        ax.fill_between(dc["epoch_marks"], m - sd, m + sd, color=colours[name], alpha=0.15)
    ax.set(xscale="log", xlabel="epochs over the unique tokens", ylabel="validation bits per token",
           title="Data-constrained: validation bits against epochs (dashed: upper bound)")
    ax.legend(fontsize=8)
    return _save(plt, fig, out, "data_constrained.png")
