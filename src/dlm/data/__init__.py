"""Data: text → tokenizer → packed token stream (cached, memory-mapped) → blocks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dlm.config import DataConfig
from dlm.data.cache import build_tokenizer, open_stream, tokenize_cached
from dlm.data.corpora import load_corpus
from dlm.data.loader import BlockLoader, as_blocks
from dlm.data.tokenizers import TOKENIZERS, Tokenizer, load_tokenizer

__all__ = ["TokenData", "prepare_data", "BlockLoader", "as_blocks", "Tokenizer", "TOKENIZERS", "load_tokenizer"]


@dataclass
class TokenData:
    tokenizer: Tokenizer
    train: np.ndarray  # 1-D token stream (memory-mapped)
    val: np.ndarray


def prepare_data(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> TokenData:
    """Load ``cfg.data`` and tokenise it (once; later calls hit the cache).

    With ``tokenizer`` given (a trained run's), that one is used instead of building one.
    """
    TOKENIZERS.get(cfg.tokenizer)  # an unknown name fails before any data is read
    corpus = load_corpus(cfg.data, cfg.val_fraction)
    tok = tokenizer or build_tokenizer(cfg.tokenizer, corpus, cfg.vocab_size, cfg.val_fraction)
    folder = tokenize_cached(corpus, tok, cfg.val_fraction)
    return TokenData(tok, open_stream(folder, "train"), open_stream(folder, "val"))
