"""Likelihood evaluation: NLL, perplexity, bits per token and bits per byte.

For an autoregressive model the NLL is exact. For a diffusion model it is the NELBO, an
upper bound on −log p, estimated with ``mc_samples`` Monte Carlo times per sequence; every
figure derived from it (perplexity, bits) is then an upper bound too.

* ``nll``: total nats over all evaluated tokens / number of tokens (block-level, each
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

from dlm.data import Tokenizer, as_blocks
from dlm.device import autocast
from dlm.errors import DlmError
from dlm.families import Family

LN2 = math.log(2.0)


def select_blocks(stream: np.ndarray, seq_len: int, max_tokens: int) -> np.ndarray:
    """All blocks, or ≤ max_tokens worth of them spread evenly over the split."""
    blocks = as_blocks(stream, seq_len)
    if len(blocks) == 0:
        raise DlmError(f"the evaluation split has {len(stream)} tokens, fewer than one sequence of {seq_len}")
    if max_tokens and len(blocks) * seq_len > max_tokens:
        n = max(1, max_tokens // seq_len)
        blocks = blocks[np.linspace(0, len(blocks) - 1, n).round().astype(np.int64)]
    return blocks


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
) -> dict:
    if mc_samples < 1:
        raise DlmError(f"mc_samples must be ≥ 1, got {mc_samples}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    token_bytes = tokenizer.token_bytes()
    per_seq: list[np.ndarray] = []
    for i in range(0, len(blocks), batch_size):
        x0 = torch.from_numpy(blocks[i : i + batch_size].astype(np.int64)).to(device)
        with autocast(device):
            per_seq.append(family.nll(model, x0, generator, mc_samples).double().cpu().numpy())
    model.train(was_training)
    nll_seq = np.concatenate(per_seq)  # (N,) nats per sequence
    n, L = blocks.shape
    total_tokens = n * L
    total_bytes = int(token_bytes[blocks].sum())
    nll = float(nll_seq.sum() / total_tokens)
    stderr = float(np.std(nll_seq / L, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
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
        "mc_samples": mc_samples if family.is_bound else 0,
    }
    if train_stream is not None:
        result.update(unigram_references(tokenizer, train_stream, blocks))
    return result


def unigram_references(tokenizer: Tokenizer, train_stream: np.ndarray, blocks: np.ndarray) -> dict:
    """Bits per byte of ``blocks`` under a token unigram and a byte unigram fitted to ``train_stream``."""
    V = tokenizer.vocab_size
    train = np.bincount(np.asarray(train_stream), minlength=V).astype(np.float64)
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
