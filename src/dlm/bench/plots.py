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


def objective_kind(cfg) -> str:
    """What a run's training loss is: its family and objective (losses of one kind share an axis)."""
    objective = getattr(getattr(cfg, "objective", None), "name", None)
    return f"{cfg.family} · {objective}" if objective else f"{cfg.family} · cross-entropy"


def _loss(plt, units, colours, out: Path) -> str:
    """One panel per objective kind: different objectives' losses are different quantities."""
    kinds: dict[str, list] = {}
    for u in units:
        kinds.setdefault(objective_kind(u.model.cfg), []).append(u)
    cols = min(3, len(kinds))
    rows = -(-len(kinds) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (kind, members) in zip(axes.ravel(), kinds.items()):
        labelled = set()
        for u in members:
            metrics = metrics_rows(u.path)
            if not metrics:
                continue
            label = None if u.model.name in labelled else u.model.name
            labelled.add(u.model.name)
            ax.plot([r["step"] for r in metrics], [r["loss"] for r in metrics], color=colours[u.model.name], alpha=0.7,
                    lw=1, label=label)
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(kinds):]:
        ax.axis("off")
    fig.suptitle("Training loss, every seed: one panel per objective (losses of different objectives are not "
                 "comparable)", fontsize=9)
    return _save(plt, fig, out, "training_loss.png")


def _gen_ppl(plt, results, colours, out: Path) -> str:
    """Gen PPL against sampling seconds, mean ± std over seeds in both, labelled with the steps."""
    from dlm.bench.report import at_key, samplers_of

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results["models"].items():
        a = r["aggregate"]
        for sampler, style in zip(samplers_of(results), ("o-", "s--", "^:", "d-.")):
            points = [(a[f"seconds_per_sample@{k}"], a[f"gen_ppl@{k}"], a[f"steps@{k}"]["mean"])
                      for k in (at_key(st, sampler) for st in results["settings"]["sample_steps"])
                      if f"gen_ppl@{k}" in a and a[f"gen_ppl@{k}"]["mean"] is not None]
            if not points:
                continue
            x, y, st = zip(*points)
            ax.errorbar([p["mean"] for p in x], [p["mean"] for p in y], xerr=[p["std"] or 0 for p in x],
                        yerr=[p["std"] or 0 for p in y], fmt=style if len(points) > 1 else "*", ms=5 if len(points) > 1 else 11,
                        capsize=3, color=colours[name], label=name + (f" ({sampler})" if sampler else ""))
            for p, q, si in zip(x, y, st):
                ax.annotate(f"{si:.0f}", (p["mean"], q["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    seeds = len(results["seeds"])
    ax.set(xscale="log", yscale="log", xlabel="sampling seconds per sample (batches of up to 16)",
           ylabel="Gen PPL (lower is better)",
           title="Sample quality against sampling time (labels: steps; " +
                 (f"bars: ± std over {seeds} seeds)" if seeds > 1 else "one seed: no error bars)"))
    ax.legend(fontsize=7)
    return _save(plt, fig, out, "gen_ppl_vs_time.png")


def _bits(plt, results, colours, out: Path) -> str:
    """Bits per token: each seed, the mean ± std, and the reference floors; the axis spans the
    figures (not from 0), so the differences show."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(results["models"])
    shown = []
    for i, name in enumerate(names):
        r = results["models"][name]
        values = [f["bits_per_token"] for f in r["figures"].values() if "bits_per_token" in f]
        if not values:
            continue
        shown += values
        ax.errorbar(i, np.mean(values), yerr=np.std(values, ddof=1) if len(values) > 1 else None, fmt="D" if r["bound"] else "o",
                    color=colours[name], ms=8, capsize=5, mfc="none" if r["bound"] else colours[name])
        ax.scatter([i] * len(values), values, color="k", s=10, zorder=3)
    b = results.get("baselines") or {}
    for key, label, ls in (("unigram_bits_per_token", "token unigram", ":"), ("source_block_bits", "source (truth)", "--")):
        if key in b:
            ax.axhline(b[key], color="grey", ls=ls, lw=1)
            ax.text(0.01, b[key], label, transform=ax.get_yaxis_transform(), fontsize=7, va="bottom", color="grey")
            shown.append(b[key])
    if shown:
        lo, hi = min(shown), max(shown)
        pad = 0.08 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set(ylabel="validation bits per token (axis not from 0)",
           title="Bits per token: each seed, mean ± std (open: upper bound)")
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
