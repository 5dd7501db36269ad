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
    return val_blocks(data, run.cfg.data.seq_len, max_tokens)


def val_blocks(data, seq_len: int, max_tokens: int) -> np.ndarray:
    from dlm.evaluate import select_rows

    rows, _ = data.rows("val", seq_len)
    return np.asarray(rows[select_rows(rows, max_tokens)])


def floors(cfg, data, infill_lengths: list[int] = (), infill_rows: int = 0) -> dict:
    """What no model needs to learn, on the validation tokens the likelihood is measured on
    (run config ``cfg``'s sequence length and ``eval.max_tokens``): the token unigram of the
    training split (add-½ smoothing) in bits per token and per byte, the most frequent training
    token, and for a synthetic source (``dlm.data.sources``) its exact −log p of those tokens,
    its entropy rate and the expected figure of a block seen without its past; and the accuracy
    of filling every masked-token completion span (``infill``'s rows and spans) with that token."""
    from dlm.data.sources import SourceJudge, source_of
    from dlm.data.cache import token_counts
    from dlm.evaluate import unigram_references

    blocks = val_blocks(data, cfg.data.seq_len, cfg.eval.max_tokens)
    tok = data.tokenizer
    tokens, n_bytes = int(blocks.size), int(tok.token_bytes()[blocks].sum())
    per_byte = unigram_references(tok, data.train, blocks)["unigram_bits_per_byte"]
    counts = token_counts(data.train, tok.vocab_size)
    top = int(np.argmax(counts))
    r = {"tokens": tokens, "bytes": n_bytes, "seq_len": cfg.data.seq_len, "unigram_bits_per_byte": per_byte,
         "unigram_bits_per_token": per_byte * n_bytes / tokens, "most_frequent_id": top,
         "most_frequent": tok.decode([top]), "most_frequent_share": float(counts[top] / counts.sum()), "infill": {}}
    L = cfg.data.seq_len
    for length in infill_lengths:
        if length < L - 1:
            start = (L - length) // 2  # infill's span
            span = val_blocks(data, L, infill_rows * L)[:infill_rows, start:start + length]
            r["infill"][str(length)] = float((span == top).mean())
    source = source_of(cfg.data.data)
    if source is not None:
        docs = [tok.decode(row[row != tok.eos_id].tolist()) for row in blocks]  # end-of-text: not a symbol
        r.update({"source": source.name, "source_bits_per_token": SourceJudge(source).figures(docs)["source_bits_per_token"],
                  "source_entropy_rate_bits": source.entropy_rate / math.log(2),
                  "source_block_bits": source.block_entropy(L) / math.log(2),
                  "source_likely_share": source.likely_share,
                  # samples of what a model that learned only the unigram / the first-order chain … would draw
                  "source_reference_samples": {str(k): SourceJudge(source).figures(source.reference_samples(k, 256, L))
                                               for k in range(source.order + 1)}})
    return r


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


def sample_quality(run, judge, steps: int, num: int, batch: int, seed: int, sampler: str | None = None) -> dict:
    """Gen PPL under ``judge`` and sample entropy of ``num`` samples at ``steps`` sampling steps
    (with the run's sampler, or the family's ``sampler``); on a synthetic source also the
    samples' exact bits per token under it and the share of likely transitions; the first
    ``EXAMPLES`` samples' text."""
    from dlm.data.sources import SourceJudge, source_of
    from dlm.evaluate import sample_documents

    settings = sampler_settings(run, steps=steps, name=sampler)
    tokens, seconds, nfe = draw(run, settings, num, batch, seed)
    r = {"steps": run.family.network_steps(settings, run.cfg.data.seq_len), "nfe": nfe, "samples": num,
         "seconds_per_sample": seconds / num}
    r.update(score_samples(judge, tokens, run.tokenizer))
    source = source_of(run.cfg.data.data)
    if source is not None:
        r.update(SourceJudge(source).figures(sample_documents(tokens, run.tokenizer)))
    r["examples"] = [run.tokenizer.decode(row.tolist())[:EXAMPLE_CHARS] for row in tokens[:EXAMPLES]]
    r["example"] = r["examples"][0]
    return r


EXAMPLES, EXAMPLE_CHARS = 3, 300  # sample texts kept per measurement (the report shows them shorter)


CHEAP_S, MAX_DRAWS = 2.0, 8  # timed draws continue past ``repeats`` while they total under CHEAP_S seconds


def speed(run, steps: int, batches: list[int], repeats: int, seed: int) -> dict:
    """Sampling speed at ``steps``: for each batch size, the mean over at least ``repeats`` timed
    draws (after one untimed warm-up), more while they are cheap (up to ``MAX_DRAWS`` while
    their total is under ``CHEAP_S`` s), of seconds per batch; how many draws, batches/s,
    tokens/s and the load average."""
    settings = sampler_settings(run, steps=steps)
    L = run.cfg.data.seq_len
    draw(run, settings, 1, 1, seed)  # warm-up: allocations, first-call overheads
    r: dict = {"network_steps": run.family.network_steps(settings, L), "threads": torch.get_num_threads(),
               "load1_before": load1()}
    for b in batches:
        times: list[float] = []
        while len(times) < repeats or (sum(times) < CHEAP_S and len(times) < MAX_DRAWS):
            times.append(draw(run, settings, b, b, seed + len(times))[1])
        per_batch = float(np.mean(times))
        r[f"draws_b{b}"] = len(times)
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
