"""Tokenise once, keep the token stream on disk as a memory-mapped array.

Layout of one cache entry (``$DLM_CACHE`` or ``~/.cache/dlm``)::

    tokens/<key>/train.bin   uint16 (uint32 for vocabularies over 65,535) token stream
    tokens/<key>/val.bin
    tokens/<key>/meta.json   dtype, token counts, corpus and tokenizer fingerprints

Each document is followed by the tokenizer's end-of-text token, so the stream packs
documents back to back with a separator between them. The key hashes the corpus
fingerprint, the split fraction and the tokenizer fingerprint; an entry is written to a
temporary folder and renamed into place, so a crash never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np

from dlm.data.corpora import Corpus
from dlm.data.tokenizers import TOKENIZERS, Tokenizer, load_tokenizer
from dlm.errors import DlmError

BPE_TRAIN_CHARS = 200_000_000  # byte-level BPE is trained on at most the first 200M characters


def cache_root() -> Path:
    return Path(os.environ.get("DLM_CACHE") or Path.home() / ".cache" / "dlm")


def _key(*parts: object) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:20]


def _capped(docs: Iterator[str], limit: int) -> Iterator[str]:
    seen = 0
    for doc in docs:
        yield doc
        seen += len(doc)
        if seen >= limit:
            return


def build_tokenizer(kind: str, corpus: Corpus, vocab_size: int, val_fraction: float) -> Tokenizer:
    """Make (or reuse from the cache) the tokenizer of ``kind`` for ``corpus``'s train split."""
    cls = TOKENIZERS.get(kind)
    if kind in ("byte", "gpt2"):
        return cls.build((), vocab_size)
    path = cache_root() / "tokenizers" / f"{kind}-{_key(corpus.fingerprint, val_fraction, vocab_size)}.json"
    if path.is_file():
        return load_tokenizer(path)
    tok = cls.build(_capped(corpus.docs("train"), BPE_TRAIN_CHARS), vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    return tok


def _write_stream(docs: Iterator[str], tok: Tokenizer, path: Path, dtype) -> int:
    count = 0
    eos = np.array([tok.eos_id], dtype=dtype)
    with open(path, "wb") as f:
        while batch := list(islice(docs, 64)):
            for ids in tok.encode_batch(batch):
                ids.astype(dtype).tofile(f)
                eos.tofile(f)
                count += len(ids) + 1
    return count


def tokenize_cached(corpus: Corpus, tok: Tokenizer, val_fraction: float) -> Path:
    """The cache folder holding ``corpus`` tokenised by ``tok``; tokenises on first use."""
    final = cache_root() / "tokens" / _key(corpus.fingerprint, val_fraction, tok.fingerprint())
    if (final / "meta.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        counts = {split: _write_stream(corpus.docs(split), tok, tmp / f"{split}.bin", dtype) for split in ("train", "val")}
        if counts["train"] == 0:
            raise DlmError(f"no text found in data '{corpus.name}'")
        meta = {
            "dtype": np.dtype(dtype).name,
            "tokens": counts,
            "corpus": corpus.fingerprint,
            "tokenizer": tok.fingerprint(),
            "vocab_size": tok.vocab_size,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def open_stream(folder: Path, split: str) -> np.ndarray:
    meta = json.loads((folder / "meta.json").read_text())
    n = meta["tokens"][split]
    if n == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(folder / f"{split}.bin", dtype=meta["dtype"], mode="r", shape=(n,))


def require_blocks(stream: np.ndarray, seq_len: int, what: str) -> None:
    if len(stream) < seq_len:
        raise DlmError(f"the {what} split has {len(stream)} tokens, fewer than one sequence of {seq_len}")
