"""Evaluating a loaded run (``dlm.runs.LoadedRun``): which bound it reports, its likelihood
on a split, the quality of its unconditional samples and of its answers to prompts.

Each function returns a flat dict of JSON values (``dlm eval --json`` prints their union);
the maths lives in ``dlm.evaluate``, this layer picks the rows, seeds and settings.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dlm.data import is_pairs_data, prepare_data
from dlm.device import generator
from dlm.errors import DlmError
from dlm.evaluate import (answer_accuracy, evaluate_likelihood, generative_perplexity, sample_documents,
                          sample_entropy, select_rows)
from dlm.service.sampling import generate
from dlm.service.training import answer_width


def configure_bound(run, log_t_share: float | None = None, time_stride: int | None = None,
                    carry: float | None = None, name: str | None = None) -> None:
    """Set how ``run``'s likelihood bound is estimated: the share of log-uniform Monte Carlo
    times (``eval.log_t_share``), the discrete-time stride (``eval.time_stride``) and the
    carry-over x_θ of uniform-state runs; None leaves the run's own. A setting the family has
    no use for fails with one line naming the run as ``name`` (default: its path)."""
    name = str(run.path) if name is None else name
    if log_t_share is not None:
        if not run.family.bound_draws_time(run.cfg):
            raise DlmError(f"--log-t-share is for bounds integrated over a random time (usdm, mdlm with time "
                           f"conditioning); {name}'s {run.family.bound_kind(run.cfg)}")
        run.cfg.eval.log_t_share = log_t_share
    if time_stride is not None:
        if not run.family.discrete_time:
            raise DlmError(f"--time-stride is for discrete-time runs (d3pm); {name} is a '{run.cfg.family}' run")
        run.cfg.eval.time_stride = time_stride
    if carry is not None:
        run.family.set_carry(carry)  # refused, with one line, by a family that has no carry-over x_θ


def run_summary(run) -> dict:
    """What every evaluation result starts with: the run folder, its step and family."""
    return {"run": str(run.path), "step": run.step, "family": run.cfg.family}


def evaluate_data(run, data, split: str = "val", train_stream: np.ndarray | None = None,
                  mc_samples: int | None = None, max_tokens: int | None = None, batch_size: int | None = None,
                  seed: int = 0) -> dict:
    """Likelihood figures (``dlm.evaluate.evaluate_likelihood``) of ``run`` on ``split`` of the
    prepared ``data`` (``dlm.data.prepare_data``): at most ``max_tokens`` of its rows spread
    evenly, prompts of prompt/response rows as clean context. None takes the run's
    ``eval`` settings; ``train_stream`` adds the unigram reference floors fitted to it."""
    cfg = run.cfg
    rows, clean = data.rows(split, cfg.data.seq_len)
    keep = select_rows(rows, cfg.eval.max_tokens if max_tokens is None else max_tokens)
    pad = filling_pad(data.lengths(split), rows.shape[1], cfg.data.sft_length)
    result = evaluate_likelihood(
        run.family, run.model, rows[keep], run.tokenizer, generator(run.device, seed),
        mc_samples=cfg.eval.mc_samples if mc_samples is None else mc_samples,
        batch_size=cfg.eval.batch_size if batch_size is None else batch_size,
        train_stream=train_stream,
        clean=None if clean is None else clean[keep],
        pad=None if pad is None else pad[keep],
    )
    if data.is_pairs:
        result.update(what_is_scored(result, pad is None))
    return result


def filling_pad(lengths: np.ndarray | None, width: int, sft_length: str) -> np.ndarray | None:
    """Prompt/response rows of a run trained with ``data.sft_length=batch``: (N, L) True on each
    row's end-of-text filling after its response's first end-of-text (padding: neither scored
    nor attended), so the figures cover the response and where it ends. None for text blocks
    and for ``model`` runs, which trained on (and are scored over) the whole filled row."""
    if lengths is None or sft_length != "batch":
        return None
    return np.arange(width)[None, :] >= lengths[:, None]


def what_is_scored(result: dict, filling: bool) -> dict:
    """What the figures of a prompt/response evaluation cover. With the end-of-text filling
    scored (``model`` runs) per byte figures would divide the filling's nats by the response's
    bytes (the filling stands for none): they are left out (None), per token figures stay."""
    if not filling:
        return {"scored": "responses"}
    return {"scored": "responses and their end-of-text filling", "bits_per_byte": None,
            "stderr_bits_per_byte": None, "unigram_bits_per_byte": None, "byte_unigram_bits_per_byte": None}


def evaluate_run(run, data: str | None = None, split: str = "val", mc_samples: int | None = None,
                 max_tokens: int | None = None, batch_size: int | None = None, seed: int = 0) -> dict:
    """``dlm eval``'s likelihood: NLL, PPL, bits per token and per byte of ``run`` on ``split``
    of its own data, or of ``data`` tokenised with the run's tokenizer (the reference floors
    are fitted to the run's own training split either way), with the run's summary."""
    cfg = run.cfg
    own = prepare_data(cfg.data, run.tokenizer)
    target = prepare_data(dataclasses.replace(cfg.data, data=data), run.tokenizer) if data else own
    result = evaluate_data(run, target, split, own.train, mc_samples, max_tokens, batch_size, seed)
    result.update({**run_summary(run), "data": data or cfg.data.data, "split": split})
    return result


def score_samples(judge, tokens: np.ndarray, tokenizer) -> dict:
    """Gen PPL of samples ``tokens`` (N, L) under ``judge`` (a ``dlm.judge.Judge``) and their
    unigram entropy, end-of-text excluded (``dlm.evaluate``)."""
    result = generative_perplexity(judge, sample_documents(tokens, tokenizer))
    result.update(sample_entropy(tokens, tokenizer.eos_id))
    return result


def sample_quality(run, judge, num: int, settings, batch: int, seed: int) -> dict:
    """Gen PPL under ``judge`` (a loaded ``dlm.judge.Judge``, a judge name, or None: the default)
    and the entropy of ``num`` unconditional samples of the training length, drawn ``batch``
    at a time with sampler ``settings``; with the sampling's steps, calls and speed."""
    from dlm.judge import load_judge

    cfg = run.cfg
    if num < 1:
        raise DlmError(f"--samples must be ≥ 1, got {num}")
    if batch < 1:
        raise DlmError(f"--sample-batch must be ≥ 1, got {batch}")
    if judge is None or isinstance(judge, str):
        judge = load_judge(judge, run.device)  # before sampling: a bad judge fails at once
    length = cfg.data.seq_len
    tokens, nfe, seconds = generate(run, num, length, None, settings, seed, batch)
    result = {
        "samples": num,
        "sample_length": length,
        "sample_steps": run.family.network_steps(settings, length),
        "sample_nfe": nfe,
        "sample_seconds": seconds,
        "sample_tokens_per_s": num * length / seconds,
        "sampler": cfg.sampler.name,
        "temperature": settings.temperature,
        "top_k": settings.top_k,
        "top_p": settings.top_p,
    }
    result.update(score_samples(judge, tokens.numpy(), run.tokenizer))
    return result


def answer_rows(run, data: str | None, split: str, num: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``num`` prompt/response rows of ``split`` (of the run's data, or of ``data``)
    and their clean (prompt) masks, both (num, L)."""
    spec = data or run.cfg.data.data
    if not is_pairs_data(spec):
        raise DlmError(f"--answers needs a run fine-tuned on prompt/response pairs (or --data pairs); "
                       f"'{spec}' is plain text")
    rows, clean = prepare_data(dataclasses.replace(run.cfg.data, data=spec), run.tokenizer).rows(split, run.cfg.data.seq_len)
    width = answer_width(run, int(clean[:num].sum(1).max()))  # a data.sft_length=batch run: its longest training row
    return rows[:num, :width], clean[:num, :width]


def answer_quality(run, answer_rows: tuple[np.ndarray, np.ndarray], settings, batch: int, seed: int) -> dict:
    """Exact match and token accuracy (``dlm.evaluate.answer_accuracy``) of the answers ``run``
    generates after each prompt of ``answer_rows`` (rows, clean masks), ``batch`` at a time."""
    if batch < 1:
        raise DlmError(f"--sample-batch must be ≥ 1, got {batch}")
    rows, clean = answer_rows
    result = answer_accuracy(run.family, run.model, rows, clean, run.tokenizer, generator(run.device, seed),
                             settings, batch_size=batch)
    result.update({"answer_temperature": settings.temperature, "answer_steps": run.family.network_steps(settings, rows.shape[1])})
    return result
