"""The figures measured on every run of a comparison, each the same way for every family:
likelihood, sample quality at a sampling budget, sampling speed, masked-token completion.

Each function takes a loaded run (``dlm.runs.LoadedRun``) and returns a flat dict of JSON
numbers, so the comparison can cache it as one part of the run's evaluation.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

from dlm.config import ComponentConfig
from dlm.device import generator


def load1() -> float:
    """The 1-minute load average (other jobs on the cores make wall times swing)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def sampler_settings(run, **changes):
    """The run's own sampler with ``changes`` (steps, temperature) on top."""
    own = run.cfg.sampler
    return run.family.choose_sampler(ComponentConfig(own.name, {**own.settings, **changes}))


def eval_rows(run, data, max_tokens: int) -> np.ndarray:
    """The validation blocks every model is scored on: the same tokens for every run of one tokenizer."""
    from dlm.evaluate import select_rows

    rows, _ = data.rows("val", run.cfg.data.seq_len)
    return np.asarray(rows[select_rows(rows, max_tokens)])


def likelihood(run, data, seed: int) -> dict:
    """NLL, PPL, bits per token and per byte with their standard errors (``dlm eval``'s figures)."""
    from dlm.evaluate import evaluate_likelihood

    cfg = run.cfg
    rows = eval_rows(run, data, cfg.eval.max_tokens)
    r = evaluate_likelihood(run.family, run.model, rows, run.tokenizer, generator(run.device, seed),
                            mc_samples=cfg.eval.mc_samples, batch_size=cfg.eval.batch_size, train_stream=data.train)
    r["stderr_bits_per_token"] = r["stderr"] / math.log(2)
    return r


def _synchronize(run) -> None:
    if run.device.type == "cuda":
        torch.cuda.synchronize()


def draw(run, settings, num: int, batch: int, seed: int) -> tuple[np.ndarray, float, int]:
    """``num`` unconditional samples of the training length, ``batch`` at a time from one
    seeded generator: (tokens (num, L), sampling seconds, network calls per batch)."""
    L = run.cfg.data.seq_len
    gen = generator(run.device, seed)
    rows, seconds, nfe = [], 0.0, 0
    for start in range(0, num, batch):
        t0 = time.perf_counter()
        with torch.no_grad():
            tokens, nfe = run.family.generate(run.model, min(batch, num - start), L, None, gen, settings)
        _synchronize(run)
        seconds += time.perf_counter() - t0
        rows.append(tokens.cpu())
    return torch.cat(rows).numpy(), seconds, nfe


def sample_quality(run, judge, steps: int, num: int, batch: int, seed: int) -> dict:
    """Gen PPL under ``judge`` and sample entropy of ``num`` samples at ``steps`` sampling steps."""
    from dlm.evaluate import generative_perplexity, sample_documents, sample_entropy

    settings = sampler_settings(run, steps=steps)
    tokens, seconds, nfe = draw(run, settings, num, batch, seed)
    r = {"steps": run.family.network_steps(settings, run.cfg.data.seq_len), "nfe": nfe, "samples": num,
         "seconds_per_sample": seconds / num}
    r.update(generative_perplexity(judge, sample_documents(tokens, run.tokenizer)))
    r.update(sample_entropy(tokens, run.tokenizer.eos_id))
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
    t0 = time.perf_counter()
    with torch.no_grad():
        out, nfe = run.family.sample(run.model, given, clean, generator(run.device, seed), settings)
    _synchronize(run)
    seconds = time.perf_counter() - t0
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
