"""Likelihood evaluation: NLL, perplexity, bits per token and bits per byte.

For an autoregressive model the NLL is exact. For a diffusion model it is the NELBO, an
upper bound on −log p, estimated with ``mc_samples`` Monte Carlo draws per sequence; every
figure derived from it (perplexity, bits) is then an upper bound too.

Conditional likelihood: rows may carry a clean mask (a prompt, a context) and a padding
mask; then only the target tokens are scored, given the clean ones: −log p(target | context),
exact for AR, and for the diffusion families a bound whose forward process corrupts only
the target (masked diffusion: LLaDA's conditional estimator over the number of masked
target tokens; uniform state: the NELBO with the context kept clean).

* ``nll``: total nats over all scored tokens / number of scored tokens (text blocks: each
  block of ``seq_len`` tokens scored jointly, its first token included).
* ``bits_per_byte``: total nats / ln 2 / UTF-8 bytes the tokens stand for (special tokens
  count 0 bytes): comparable across tokenizers.
* ``stderr``: standard error of ``nll`` over sequences, std(nll_i / L) / √n. For a diffusion
  model it holds both the Monte Carlo noise of the bound and the spread of the text.
* ``unigram_bits_per_byte`` / ``byte_unigram_bits_per_byte``: reference floors on the
  same tokens, a unigram model over the run's tokens and one over bytes, both fitted to the
  training split (add-½ smoothing). The token unigram of a large vocabulary is already a
  word-level model; the byte unigram does not depend on the tokenizer.

Sample quality (``dlm eval --samples N``), on N unconditional samples from the model:

* ``gen_ppl``: generative perplexity under a pretrained judge (``dlm.judge``). Each sample
  is split at the run tokenizer's end-of-text token (``eos_id``) into documents, each piece
  decoded with the run's tokenizer, and empty (or whitespace-only) documents dropped. Each
  document is scored by the judge after one context token (its BOS, or end-of-text), which
  is not scored; no end-of-text is scored either. ``gen_ppl = exp(judge_nll)`` with
  ``judge_nll`` = total NLL over every judge token of every document / ``judge_tokens``: a
  corpus-level mean over judge tokens, not a mean of per-sample perplexities.
* ``entropy``: mean over samples of the unigram entropy (nats) of each sample's generated
  token ids, prompt and end-of-text tokens excluded (end-of-text separates and pads
  documents in dlm's packed data, so it says nothing about diversity); ``entropy_std`` is
  its standard deviation over samples. A sample of one repeated token has entropy 0, one of
  L distinct tokens log L. Low entropy flags the repetitive text that a low Gen PPL can hide.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dlm.batch import Batch
from dlm.data import Tokenizer, as_blocks
from dlm.data.cache import token_counts
from dlm.device import autocast
from dlm.errors import DlmError
from dlm.families import Family

LN2 = math.log(2.0)


def select_blocks(stream: np.ndarray, seq_len: int, max_tokens: int) -> np.ndarray:
    """All blocks, or ≤ max_tokens worth of them spread evenly over the split."""
    blocks = as_blocks(stream, seq_len)
    if len(blocks) == 0:
        raise DlmError(f"the evaluation split has {len(stream)} tokens, fewer than one sequence of {seq_len}")
    return blocks[select_rows(blocks, max_tokens)]


def select_rows(rows: np.ndarray, max_tokens: int) -> np.ndarray:
    """Indices of all rows, or of ≤ max_tokens worth of them spread evenly."""
    n_rows, L = rows.shape
    if max_tokens and n_rows * L > max_tokens:
        n = max(1, max_tokens // L)
        return np.linspace(0, n_rows - 1, n).round().astype(np.int64)
    return np.arange(n_rows)


@torch.no_grad()
def evaluate_likelihood(
    family: Family,
    model: torch.nn.Module,
    blocks: np.ndarray,
    tokenizer: Tokenizer,
    generator: torch.Generator,
    mc_samples: int = 4,
    batch_size: int = 32,
    train_stream: np.ndarray | None = None,
    clean: np.ndarray | None = None,
    pad: np.ndarray | None = None,
) -> dict:
    """Likelihood figures of the target tokens of ``blocks`` (N, L) (every token, or those
    neither ``clean`` nor ``pad``, (N, L) bool)."""
    if mc_samples < 1:
        raise DlmError(f"mc_samples must be ≥ 1, got {mc_samples}")
    if batch_size < 1:
        raise DlmError(f"batch_size must be ≥ 1, got {batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    token_bytes = tokenizer.token_bytes()

    def part(mask, sl):
        return None if mask is None else torch.from_numpy(np.asarray(mask[sl], dtype=bool))

    per_seq: list[np.ndarray] = []
    for i in range(0, len(blocks), batch_size):
        sl = slice(i, i + batch_size)
        batch = Batch(torch.from_numpy(blocks[sl].astype(np.int64)), part(clean, sl), part(pad, sl)).to(device)
        with autocast(device):
            per_seq.append(family.nll(model, batch, generator, mc_samples).double().cpu().numpy())
    model.train(was_training)
    nll_seq = np.concatenate(per_seq)  # (N,) nats per sequence
    n, L = blocks.shape
    target = np.ones(blocks.shape, dtype=bool)
    for mask in (clean, pad):
        if mask is not None:
            target &= ~np.asarray(mask, dtype=bool)
    tokens_seq = target.sum(1)
    total_tokens = int(tokens_seq.sum())
    if total_tokens == 0:
        raise DlmError("nothing to score: every token of the evaluated rows is clean context or padding")
    total_bytes = int(token_bytes[blocks][target].sum())
    nll = float(nll_seq.sum() / total_tokens)
    scored = tokens_seq > 0
    per_token = nll_seq[scored] / tokens_seq[scored]
    stderr = float(np.std(per_token, ddof=1) / math.sqrt(len(per_token))) if len(per_token) > 1 else float("nan")
    result = {
        "nll": nll,
        "ppl": math.exp(nll),
        "bits_per_token": nll / LN2,
        "bits_per_byte": float(nll_seq.sum() / LN2 / max(total_bytes, 1)),
        "stderr": stderr,
        "stderr_bits_per_byte": stderr * total_tokens / LN2 / max(total_bytes, 1),
        "tokens": total_tokens,
        "bytes": total_bytes,
        "sequences": n,
        "seq_len": L,
        "bound": family.is_bound,
        "conditional": clean is not None,
        "mc_samples": mc_samples if family.is_bound else 0,
        **family.bound_info(),
    }
    if train_stream is not None:
        result.update(unigram_references(tokenizer, train_stream, blocks[target]))
    return result


def unigram_references(tokenizer: Tokenizer, train_stream: np.ndarray, blocks: np.ndarray) -> dict:
    """Bits per byte of the tokens ``blocks`` (any shape) under a token unigram and a byte
    unigram fitted to the tokens ``train_stream`` (any shape)."""
    V = tokenizer.vocab_size
    train = token_counts(train_stream, V).astype(np.float64)  # in bounded chunks: a split may be larger than memory
    held = np.bincount(blocks.ravel(), minlength=V).astype(np.float64)
    strings = tokenizer.token_byte_strings()

    def byte_counts(token_counts: np.ndarray) -> np.ndarray:
        out = np.zeros(256)
        for i in np.flatnonzero(token_counts):
            if strings[i]:
                np.add.at(out, np.frombuffer(strings[i], dtype=np.uint8), token_counts[i])
        return out

    total_bytes = max(float(held @ tokenizer.token_bytes()), 1.0)
    token_logp = np.log((train + 0.5) / (train + 0.5).sum())
    train_bytes = byte_counts(train) + 0.5
    byte_logp = np.log(train_bytes / train_bytes.sum())
    return {
        "unigram_bits_per_byte": float(-(held * token_logp).sum() / LN2 / total_bytes),
        "byte_unigram_bits_per_byte": float(-(byte_counts(held) * byte_logp).sum() / LN2 / total_bytes),
    }


def sample_entropy(tokens: np.ndarray, eos_id: int | None = None, prompt_len: int = 0) -> dict:
    """Mean and std over samples of the unigram entropy (nats) of each row of ``tokens`` (N, L).

    H = −Σ_v p_v log p_v with p_v the frequency of token v among the row's tokens after the
    first ``prompt_len``, ``eos_id`` tokens excluded; a row with no token left counts 0.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or len(tokens) == 0:
        raise ValueError(f"`tokens` must be a non-empty (N, L) array, got shape {tokens.shape}")
    values = []
    for row in tokens[:, prompt_len:]:
        if eos_id is not None:
            row = row[row != eos_id]
        if len(row) == 0:
            values.append(0.0)
            continue
        p = np.unique(row, return_counts=True)[1] / len(row)
        values.append(float(-(p * np.log(p)).sum()))
    return {"entropy": float(np.mean(values)), "entropy_std": float(np.std(values))}


def sample_documents(tokens: np.ndarray, tokenizer: Tokenizer, prompt_len: int = 0) -> list[str]:
    """The documents of every sample: each row split at ``tokenizer.eos_id``, decoded, empty ones dropped."""
    docs = []
    for row in np.asarray(tokens)[:, prompt_len:]:
        cuts = np.flatnonzero(row == tokenizer.eos_id)
        for piece in np.split(row, cuts):
            piece = piece[piece != tokenizer.eos_id]
            text = tokenizer.decode(piece.tolist()) if len(piece) else ""
            if text.strip():
                docs.append(text)
    return docs


def generative_perplexity(judge, documents: list[str]) -> dict:
    """Gen PPL of ``documents`` under ``judge`` (a ``dlm.judge.Judge``): exp(total NLL / total judge tokens)."""
    nll, count = judge.score(documents)
    total, n = float(nll.sum()), int(count.sum())
    mean = total / n if n else float("nan")
    return {
        "gen_ppl": math.exp(mean) if n else float("nan"),
        "judge_nll": mean,
        "judge_tokens": n,
        "judge_documents": len(documents),
        "judge": judge.name,
    }


def _ratio_stderr(hits: np.ndarray, counts: np.ndarray) -> float:
    """Standard error of sum(hits) / sum(counts) over rows (the ratio estimator's delta method,
    rows as clusters): √(Σ (h_i − r·c_i)² / (n (n − 1))) / mean(c)."""
    n = len(counts)
    if n < 2 or counts.sum() == 0:
        return float("nan")
    r = hits.sum() / counts.sum()
    return float(math.sqrt(((hits - r * counts) ** 2).sum() / (n * (n - 1))) / counts.mean())


@torch.no_grad()
def answer_accuracy(
    family: Family,
    model: torch.nn.Module,
    rows: np.ndarray,
    clean: np.ndarray,
    tokenizer: Tokenizer,
    generator: torch.Generator,
    settings=None,
    batch_size: int = 16,
    examples: int = 3,
) -> dict:
    """How well a fine-tuned model answers: generate after the clean prompt of each row of
    ``rows`` (N, L) (``clean`` (N, L) bool: the prompt) and compare with the reference.

    * ``answer_exact_match``: the generated answer, decoded up to its first end-of-text and
      stripped, equals the stripped reference response; stderr √(p(1−p)/(N−1)).
    * ``answer_token_accuracy``: over the reference's target tokens — its response tokens and
      the first end-of-text after them (the whole rest of the row if the response was cut) —
      the fraction the generated row holds at the same positions; the ratio of sums over
      rows, its stderr by the delta method with rows as clusters.

    The reference answer is never shown to the sampler: every non-clean position starts from
    token 0 (the sampler replaces it with its prior). Rows go to the sampler in order of
    prompt length (the autoregressive sampler generates rows of equal prefix length together),
    ``batch_size`` at a time, from the one ``generator``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    clean = np.asarray(clean, dtype=bool)
    if rows.ndim != 2 or rows.shape != clean.shape or len(rows) == 0:
        raise DlmError(f"answer_accuracy needs (N, L) rows and a clean mask of the same shape, got "
                       f"{rows.shape} and {clean.shape}")
    if batch_size < 1:
        raise DlmError(f"batch_size must be ≥ 1, got {batch_size}")
    generated, nfe, seconds = _generate_answers(family, model, rows, clean, generator, settings, batch_size)
    scores, shown = _score_answers(rows, generated, clean.sum(1), tokenizer, examples)
    return {**scores, "answer_nfe": nfe, "answer_seconds": seconds, "answer_examples": shown}


def _generate_answers(family: Family, model: torch.nn.Module, rows: np.ndarray, clean: np.ndarray,
                      generator: torch.Generator, settings, batch_size: int) -> tuple[np.ndarray, int, float]:
    """Every row (N, L) with its non-clean positions generated after its clean prompt:
    (generated (N, L), network calls summed over batches, sampling seconds)."""
    import time

    n = len(rows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generated = np.empty_like(rows)
    nfe, seconds = 0, 0.0
    order = np.argsort(clean.sum(1), kind="stable")
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        given = torch.from_numpy(np.where(clean[idx], rows[idx], 0)).to(device)
        mask = torch.from_numpy(clean[idx]).to(device)
        t0 = time.perf_counter()
        with autocast(device):  # as `dlm sample` does: bf16 on CUDA
            out, calls = family.sample(model, given, mask, generator, settings)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        generated[idx] = out.cpu().numpy()
        nfe += calls
    model.train(was_training)
    return generated, nfe, seconds


def _score_answers(rows: np.ndarray, generated: np.ndarray, prompt_len: np.ndarray, tokenizer: Tokenizer,
                   examples: int) -> tuple[dict, list[dict]]:
    """Exact match and token accuracy of ``generated`` against the reference ``rows`` (both
    (N, L)) after each row's ``prompt_len`` prompt tokens, and the first ``examples`` of them."""
    n, L = rows.shape
    eos = tokenizer.eos_id

    def until_eos(row: np.ndarray, start: int) -> np.ndarray:
        """row[start:] up to (not including) its first end-of-text."""
        tail = row[start:]
        stop = np.flatnonzero(tail == eos)
        return tail[: stop[0]] if len(stop) else tail

    exact = np.zeros(n)
    hits = np.zeros(n)
    counts = np.zeros(n)
    shown = []
    for i in range(n):
        p = int(prompt_len[i])
        ref = until_eos(rows[i], p)
        end = min(p + len(ref) + 1, L)  # the response and the end-of-text that ends it
        counts[i] = end - p
        hits[i] = (generated[i, p:end] == rows[i, p:end]).sum()
        ref_text = tokenizer.decode(ref.tolist())
        answer = tokenizer.decode(until_eos(generated[i], p).tolist())
        exact[i] = answer.strip() == ref_text.strip()
        if len(shown) < examples:
            prompt = tokenizer.decode(rows[i, :p].tolist())
            shown.append({"prompt_tail": prompt[-80:], "reference": ref_text, "answer": answer})
    em = float(exact.mean())
    return {
        "answers": n,
        "answer_exact_match": em,
        "answer_exact_match_stderr": float(math.sqrt(em * (1 - em) / (n - 1))) if n > 1 else float("nan"),
        "answer_token_accuracy": float(hits.sum() / counts.sum()),
        "answer_token_accuracy_stderr": _ratio_stderr(hits, counts),
        "answer_target_tokens": int(counts.sum()),
    }, shown
