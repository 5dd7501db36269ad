"""Data: text → tokenizer → packed token stream (cached, memory-mapped) → blocks; or
prompt/response pairs → rows with a clean prompt (``data/pairs.py``)."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlm.schema import DataConfig
from dlm.data.cache import build_tokenizer, open_stream, tokenize_cached
from dlm.data.corpora import Corpus, data_identity, hf_fingerprint, load_corpus, load_hf_dataset
from dlm.data.loader import BlockLoader, as_blocks
from dlm.data.pairs import (Pair, dataset_pairs, encode_pairs, has_pair_columns, is_pairs_file, pair_texts, read_pairs,
                            split_pairs)
from dlm.data.tasks import PAIR_TASKS
from dlm.data.tokenizers import TOKENIZERS, Tokenizer, load_tokenizer
from dlm.errors import DlmError

__all__ = ["TokenData", "prepare_data", "BlockLoader", "as_blocks", "Tokenizer", "TOKENIZERS", "load_tokenizer",
           "is_pairs_data", "load_pairs"]


@dataclass
class TokenData:
    tokenizer: Tokenizer
    # text: 1-D token stream, memory-mapped (a ShardedStream, read lazily, when the split
    # spans several shard files; as_blocks of it gives lazy (N, L) rows); pairs: (N, L) rows
    train: np.ndarray
    val: np.ndarray
    train_clean: np.ndarray | None = None  # pairs: (N, L) bool, the prompt of each row
    val_clean: np.ndarray | None = None
    identity: str | None = None  # changes whenever the data's content does (stored in the run, checked on resume)
    # pairs: (N,) each row's prompt + response + one end-of-text, the rest being end-of-text filling
    train_lengths: np.ndarray | None = None
    val_lengths: np.ndarray | None = None

    @property
    def is_pairs(self) -> bool:
        return self.train_clean is not None

    def rows(self, split: str, seq_len: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, L) token rows of ``split`` and their clean masks (None for plain text blocks)."""
        data = self.train if split == "train" else self.val
        what = "training" if split == "train" else "validation"
        if self.is_pairs:
            if len(data) == 0:
                raise DlmError(f"the {what} split has no prompt/response rows")
            return data, self.train_clean if split == "train" else self.val_clean
        if len(data) < seq_len:
            raise DlmError(f"the {what} split has {len(data)} tokens, fewer than one sequence of {seq_len}")
        return as_blocks(data, seq_len), None

    def lengths(self, split: str) -> np.ndarray | None:
        """Pairs: (N,) each row's length without its end-of-text filling; None for text blocks."""
        return self.train_lengths if split == "train" else self.val_lengths


def is_pairs_data(spec: str) -> bool:
    """A built-in instruction task, a .jsonl file of prompt/response (or messages) rows, or a
    Hugging Face dataset with those columns."""
    if spec in PAIR_TASKS or is_pairs_file(Path(spec)):
        return True
    if spec.startswith("hf:"):
        return has_pair_columns(load_hf_dataset(spec)["train"].column_names)
    return False


def load_pairs(spec: str, val_fraction: float) -> tuple[dict[str, list[Pair]], str]:
    """The train/val pairs of ``spec`` and a fingerprint of their content."""
    if spec in PAIR_TASKS:
        return PAIR_TASKS.get(spec)(val_fraction), f"pairs-task:{spec}:v1"
    if spec.startswith("hf:"):
        return dataset_pairs(load_hf_dataset(spec), spec, val_fraction), "pairs-" + hf_fingerprint(spec)
    path = Path(spec)
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    return split_pairs(read_pairs(path), val_fraction), f"pairs:{digest}"


def _prepare_pairs(cfg: DataConfig, tokenizer: Tokenizer | None) -> TokenData:
    splits, fingerprint = load_pairs(cfg.data, cfg.val_fraction)
    if tokenizer is None:  # training from scratch on pairs: the tokenizer is built from their text
        corpus = Corpus(cfg.data, fingerprint, lambda split: pair_texts(splits[split]))
        tokenizer = build_tokenizer(cfg.tokenizer, corpus, cfg.vocab_size, cfg.val_fraction)
    enc = {split: encode_pairs(splits[split], tokenizer, cfg.seq_len) for split in ("train", "val")}
    cut = enc["train"].truncated + enc["val"].truncated
    if cut:
        total = len(enc["train"].rows) + len(enc["val"].rows)
        print(f"dlm: note: {cut} of {total} responses were cut at the sequence length {cfg.seq_len}", file=sys.stderr)
    return TokenData(tokenizer, enc["train"].rows, enc["val"].rows, enc["train"].clean, enc["val"].clean,
                     data_identity(fingerprint), enc["train"].lengths, enc["val"].lengths)


def prepare_data(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> TokenData:
    """Load ``cfg.data`` and tokenise it (text once; later calls hit the cache).

    With ``tokenizer`` given (a trained run's), that one is used instead of building one.
    """
    TOKENIZERS.get(cfg.tokenizer)  # an unknown name fails before any data is read
    if is_pairs_data(cfg.data):
        if cfg.max_train_tokens:
            raise DlmError("data.max_train_tokens applies to text data, not to prompt/response pairs")
        return _prepare_pairs(cfg, tokenizer)
    corpus = load_corpus(cfg.data, cfg.val_fraction)
    tok = tokenizer or build_tokenizer(cfg.tokenizer, corpus, cfg.vocab_size, cfg.val_fraction)
    folder = tokenize_cached(corpus, tok, cfg.val_fraction)
    train = open_stream(folder, "train")
    if cfg.max_train_tokens:
        if cfg.max_train_tokens > len(train):
            raise DlmError(f"data.max_train_tokens is {cfg.max_train_tokens:,} but the training split of "
                           f"'{cfg.data}' has only {len(train):,} tokens")
        train = train[: cfg.max_train_tokens]  # the first N tokens: the tokenizer and validation split stay the same
    return TokenData(tok, train, open_stream(folder, "val"), identity=data_identity(corpus.fingerprint))
