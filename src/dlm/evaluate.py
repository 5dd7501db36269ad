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
