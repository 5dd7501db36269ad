"""The figures measured on every run of a comparison, each the same way for every family:
training throughput and loss (from metrics.jsonl), likelihood, sample quality at a sampling
budget, sampling speed, masked-token completion.

Each function takes a loaded run (``dlm.runs.LoadedRun``) and returns a flat dict of JSON
numbers, so the comparison can cache it as one part of the run's evaluation. Drawing,
filling, scoring and the likelihood itself are ``dlm.service``'s (what ``dlm eval`` and
``dlm sample`` run); this module chooses the settings and rows and shapes the figures.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from dlm.metrics import read_metrics_lines
from dlm.service import evaluate_data, generate, sample_given, sampler_settings, score_samples


def load1() -> float:
    """The 1-minute load average (other jobs on the cores make wall times swing)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def train_figures(path: Path) -> dict:
    """Training throughput and the last loss, from the run's metrics.jsonl (the first logged
    window holds the warm-up and is left out when there are others)."""
    rows = [r for r in metrics_rows(path) if "tokens_per_s" in r]
    if not rows:
        return {}
    timed = rows[1:] or rows
    return {"train_tokens_per_s": sum(r["tokens_per_s"] for r in timed) / len(timed), "train_loss": rows[-1]["loss"],
            "train_steps": rows[-1]["step"], "train_tokens": rows[-1]["tokens"], "train_s": rows[-1]["elapsed_s"]}


def metrics_rows(path: Path) -> list[dict]:
    """The complete records of a run's metrics.jsonl."""
    return [json.loads(line) for line in read_metrics_lines(path / "metrics.jsonl", 2**62)]


def eval_rows(run, data, max_tokens: int) -> np.ndarray:
    """The validation blocks every model is scored on: the same tokens for every run of one tokenizer."""
    from dlm.evaluate import select_rows

    rows, _ = data.rows("val", run.cfg.data.seq_len)
    return np.asarray(rows[select_rows(rows, max_tokens)])


def likelihood(run, data, seed: int) -> dict:
    """NLL, PPL, bits per token and per byte with their standard errors (``dlm eval``'s figures)."""
    r = evaluate_data(run, data, "val", train_stream=data.train, seed=seed)
    r["stderr_bits_per_token"] = r["stderr"] / math.log(2)
    return r


def draw(run, settings, num: int, batch: int, seed: int) -> tuple[np.ndarray, float, int]:
    """``num`` unconditional samples of the training length, ``batch`` at a time from one
    seeded generator: (tokens (num, L), sampling seconds, network calls per batch)."""
    tokens, nfe, seconds = generate(run, num, run.cfg.data.seq_len, None, settings, seed, batch)
    return tokens.numpy(), seconds, nfe


def sample_quality(run, judge, steps: int, num: int, batch: int, seed: int) -> dict:
    """Gen PPL under ``judge`` and sample entropy of ``num`` samples at ``steps`` sampling steps."""
    settings = sampler_settings(run, steps=steps)
    tokens, seconds, nfe = draw(run, settings, num, batch, seed)
    r = {"steps": run.family.network_steps(settings, run.cfg.data.seq_len), "nfe": nfe, "samples": num,
         "seconds_per_sample": seconds / num}
    r.update(score_samples(judge, tokens, run.tokenizer))
    r["example"] = run.tokenizer.decode(tokens[0].tolist())[:300]
    return r


def speed(run, steps: int, batches: list[int], repeats: int, seed: int) -> dict:
    """Sampling speed at ``steps``: for each batch size, the mean over ``repeats`` timed draws
    (after one untimed warm-up) of seconds per batch; batches/s, tokens/s and the load average."""
    settings = sampler_settings(run, steps=steps)
    L = run.cfg.data.seq_len
    draw(run, settings, 1, 1, seed)  # warm-up: allocations, first-call overheads
    r: dict = {"network_steps": run.family.network_steps(settings, L), "threads": torch.get_num_threads(),
               "load1_before": load1()}
    for b in batches:
        times = [draw(run, settings, b, b, seed + i)[1] for i in range(repeats)]
        per_batch = float(np.mean(times))
        r[f"seconds_per_batch_b{b}"] = per_batch
        r[f"batches_per_s_b{b}"] = 1.0 / per_batch
        r[f"tokens_per_s_b{b}"] = b * L / per_batch
    r["load1_after"] = load1()
    return r


def infill(run, data, length: int, rows: int, steps: int, seed: int) -> dict:
    """Masked-token completion: fill a held-out span of ``length`` tokens in the middle of each
    of ``rows`` validation blocks, greedily (temperature 0); the fraction of span tokens equal
    to the held-out ones, with its standard error over rows.

    Diffusion families see both sides of the span (every other token clean). A causal family
    can only condition on the left: it gets the prefix and generates the span after it.
    """
    L = run.cfg.data.seq_len
    if length >= L - 1:
        return {"skipped": f"span of {length} tokens does not fit in sequences of {L}"}
    blocks = eval_rows(run, data, rows * L)[:rows]
    start = (L - length) // 2  # one position for every row: a causal sampler batches rows of equal prefix
    end = start + length
    x0 = torch.as_tensor(blocks.astype(np.int64), device=run.device)
    width = end if run.family.causal else L
    given = x0[:, :width].clone()
    given[:, start:end] = 0  # the held-out span is never shown: the sampler starts it from its prior
    clean = torch.ones_like(given, dtype=torch.bool)
    clean[:, start:end] = False
    settings = sampler_settings(run, steps=steps or length, temperature=0.0)
    out, nfe, seconds = sample_given(run, given, clean, settings, seed)
    hits = (out[:, start:end] == x0[:, start:end]).double().mean(1).cpu().numpy()  # (rows,) per-row accuracy
    n = len(hits)
    return {
        "accuracy": float(hits.mean()),
        "stderr": float(hits.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "rows": n,
        "span": length,
        "context": "left only" if run.family.causal else "both sides",
        "nfe": nfe,
        "seconds": seconds,
    }
