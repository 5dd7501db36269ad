"""Tokenise once, keep the token stream on disk as memory-mapped shard files.

Layout of one cache entry (``$DLM_CACHE`` or ``~/.cache/dlm``)::

    tokens/<key>/train.bin         a split that fits one shard: its whole token stream
    tokens/<key>/train-00000.bin   a longer split: shards of at most SHARD_TOKENS tokens,
    tokens/<key>/train-00001.bin   in stream order
    tokens/<key>/val.bin
    tokens/<key>/meta.json         dtype (uint16; uint32 for vocabularies over 65,535), token
                                   counts, the shard files of each split with their token
                                   counts, corpus and tokenizer fingerprints

Each document is followed by the tokenizer's end-of-text token, so the stream packs
documents back to back with a separator between them. The key hashes the corpus
fingerprint, the split fraction and the tokenizer fingerprint; an entry is written to a
temporary folder ``tokens/.tmp-<pid>-<random>-<host>``, ``meta.json`` last, and renamed
into place, so a crash never leaves an entry that looks complete. The folders of writers
that died (SIGKILL, power cut) are removed the next time the cache is used (a killed
tokenisation restarts from the beginning; it does not resume); a live writer's never
are. An entry found corrupt (edited, truncated) is tokenised again. Entries written
before shards existed (``train.bin`` / ``val.bin``, no shard list) are read as they are.

Tokenising streams: the documents of a split are grouped into tasks of about CHUNK_CHARS
characters (a long document is cut into pieces at line breaks where that cannot change
its tokens), the tasks are encoded by a pool of worker processes (``workers``,
``$DLM_TOKENIZE_WORKERS``, default: the CPUs this process may use) with at most two per
worker in flight, and the parent writes their tokens in document order. Neither the
corpus nor the token stream is ever held whole in memory (only what the corpus reader
itself holds: one document). The stream is the same whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from dlm.data.corpora import Corpus
from dlm.data.tokenizers import TOKENIZERS, Tokenizer, load_tokenizer
from dlm.errors import DlmError
from dlm.fsio import FileSystemError, ensure_dir, fsync_dir, make_temp_dir, writer_is_gone, writing

BPE_TRAIN_CHARS = 200_000_000  # byte-level BPE is trained on at most the first 200M characters
TMP_PREFIX = ".tmp-"
TMP_IDLE_S = 3600  # another host's temporary entry untouched this long has lost its writer
SPLITS = ("train", "val")
# 2^28 tokens: 512 MiB of uint16 (1 GiB of uint32) per file. Few files for a multi-GB corpus
# (a 10 GB text is ~10 shards of GPT-2 tokens), each small enough to copy or checksum on
# its own and under the 4 GiB file limit of FAT/exFAT-formatted drives even as uint32.
SHARD_TOKENS = 1 << 28
CHUNK_CHARS = 1 << 20  # characters of text per task: ~1 MB, a few ms of overhead against ~1 s of work
PIECE_CHARS = 2048  # a longer document is cut into pieces about this long (see chunk_documents)
POOL_MIN_CHUNKS = 8  # a split of fewer chunks is tokenised in-process: starting workers costs seconds
WORKERS_ENV = "DLM_TOKENIZE_WORKERS"
# tokenizers whose tokens never change when a document is cut right after a "\n" that has a
# non-space character on both sides (char, byte: any cut; byte-level BPE: its GPT-2
# pre-tokenisation always splits there, and merges never cross pre-tokens)
CUTTABLE_KINDS = frozenset({"char", "byte", "bpe", "gpt2"})


def cache_root() -> Path:
    return Path(os.environ.get("DLM_CACHE") or Path.home() / ".cache" / "dlm")


def _key(*parts: object) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:20]


@contextmanager
def _cache_writing(path: Path):
    """``writing``, with a hint that the cache's place can be changed."""
    try:
        with writing(path):
            yield
    except FileSystemError as e:
        raise FileSystemError(f"{e} (the token cache: set DLM_CACHE to a writable folder)", e.errno) from None


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
    tok = None
    if path.is_file():
        try:
            tok = load_tokenizer(path)
        except DlmError:
            pass  # a damaged cache file: build the tokenizer again and replace it
    if tok is None:
        tok = cls.build(_capped(corpus.docs("train"), BPE_TRAIN_CHARS), vocab_size)
        with _cache_writing(path):
            tok.save(path)  # cached even when too small: the same command fails at once next time
    return _check_vocab_reached(tok, corpus, vocab_size)


def _check_vocab_reached(tok: Tokenizer, corpus: Corpus, vocab_size: int) -> Tokenizer:
    """``tok``, unless it learns its vocabulary (BPE) and the data ran out of merges before
    ``vocab_size``: a silently smaller vocabulary would make the run differ from the one asked for."""
    if tok.learns_vocab_size and tok.vocab_size < vocab_size:
        raise DlmError(
            f"the BPE vocabulary of {corpus.name} reached only {tok.vocab_size} tokens, fewer than "
            f"--vocab-size {vocab_size}: pass --vocab-size {tok.vocab_size} or less"
        )
    return tok


# ---- tokenising: chunks of documents → workers → shards in document order --------------------

Piece = tuple[str, bool]  # (text, whether it ends its document: an end-of-text token follows)


def _last_cut(doc: str, lo: int, hi: int) -> int:
    """The largest p in [lo, hi] where ``doc`` may be cut into doc[:p] + doc[p:] without
    changing its tokens (doc[p-1] is "\\n", doc[p-2] and doc[p] are not whitespace), or -1."""
    hi = min(hi, len(doc) - 1)
    while hi >= max(lo, 2):
        i = doc.rfind("\n", max(lo, 2) - 1, hi)  # i = p - 1
        if i < 0:
            return -1
        if not doc[i - 1].isspace() and not doc[i + 1].isspace():
            return i + 1
        hi = i
    return -1


def _first_cut(doc: str, lo: int) -> int:
    """The smallest such p ≥ ``lo``, or -1."""
    i = max(lo, 2) - 1
    while (i := doc.find("\n", i)) >= 0 and i + 1 < len(doc):
        if not doc[i - 1].isspace() and not doc[i + 1].isspace():
            return i + 1
        i += 1
    return -1


def cut_document(doc: str, piece_chars: int) -> Iterator[Piece]:
    """``doc`` as pieces of about ``piece_chars`` characters or fewer, cut only where cutting
    cannot change its tokens (a stretch with no such line break stays whole)."""
    start, n = 0, len(doc)
    while n - start > piece_chars:
        cut = _last_cut(doc, start + 1, start + piece_chars)
        if cut < 0:
            cut = _first_cut(doc, start + piece_chars)
            if cut < 0:
                break
        yield doc[start:cut], False
        start = cut
    yield (doc[start:] if start else doc), True


def chunk_documents(docs: Iterable[str], chunk_chars: int, cuttable: bool = True,
                    piece_chars: int | None = None) -> Iterator[list[Piece]]:
    """Group ``docs`` into tasks (lists of pieces) of about ``chunk_chars`` characters.

    When ``cuttable``, a document longer than ``piece_chars`` (default PIECE_CHARS) is cut
    into pieces at line breaks where cutting cannot change its tokens: a long document then
    spreads over several tasks, and the byte-level BPE encodes short pieces faster (about
    1.4× at 2,000 characters than at 1 MB, measured) and with far less memory.
    Concatenating the pieces in order gives back the documents.
    """
    piece_chars = PIECE_CHARS if piece_chars is None else piece_chars
    pieces: list[Piece] = []
    size = 0
    for doc in docs:
        for piece in cut_document(doc, piece_chars) if cuttable else ((doc, True),):
            pieces.append(piece)
            size += len(piece[0])
            if size >= chunk_chars:
                yield pieces
                pieces, size = [], 0
    if pieces:
        yield pieces


def encode_pieces(tok: Tokenizer, pieces: list[Piece], dtype) -> tuple[np.ndarray, int]:
    """(tokens of the pieces, each document's end followed by end-of-text; UTF-8 bytes read)."""
    parts: list[np.ndarray] = []
    eos = np.array([tok.eos_id], dtype=dtype)
    for (text, ends), ids in zip(pieces, tok.encode_batch([text for text, _ in pieces])):
        parts.append(ids.astype(dtype))
        if ends:
            parts.append(eos)
    nbytes = sum(len(text.encode("utf-8")) for text, _ in pieces)
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)), nbytes


_WORKER: dict = {}


def _watch_parent(parent: int) -> None:
    """End this worker once its parent is gone (SIGKILL leaves pool workers blocked forever)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(1)


def _worker_init(tok: Tokenizer | None, kind: str, state: dict, dtype: str, parent: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the pool is the parallelism
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent cleans up
    if tok is None:  # spawned: rebuilt from its state
        tok = TOKENIZERS.get(kind).from_state(state)
    _WORKER.update(tok=tok, dtype=np.dtype(dtype))
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _worker_encode(pieces: list[Piece]) -> tuple[np.ndarray, int]:
    return encode_pieces(_WORKER["tok"], pieces, _WORKER["dtype"])


def tokenize_workers(workers: int | None = None) -> int:
    """``workers``, else ``$DLM_TOKENIZE_WORKERS``, else the CPUs this process may run on."""
    if workers is None:
        env = os.environ.get(WORKERS_ENV, "").strip()
        if env:
            try:
                workers = int(env)
            except ValueError:
                raise DlmError(f"{WORKERS_ENV} must be a whole number ≥ 1, got '{env}'") from None
        else:
            workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers < 1:
        raise DlmError(f"tokenizer workers must be ≥ 1, got {workers}")
    return workers


class _Encoder:
    """Encodes chunks in order: in this process, or by a pool of ``workers`` processes
    started on first need.

    Workers are forked on Linux: a script that tokenises at import time, with no
    ``if __name__ == "__main__"`` guard, works (spawned workers would re-run it), and a
    worker starts in milliseconds instead of re-importing torch. Only the forking thread
    lives on in a worker; the Hugging Face tokenizers' own thread pool is switched off there
    (``TOKENIZERS_PARALLELISM=false``, set around the fork so that it warns of nothing).
    Elsewhere they are spawned and rebuild the tokenizer from ``tok.state()``.
    """

    def __init__(self, tok: Tokenizer, dtype, workers: int):
        self.tok, self.dtype, self.workers = tok, np.dtype(dtype), workers
        self.pool = None

    def __enter__(self) -> "_Encoder":
        return self

    def __exit__(self, kind, *_) -> None:
        if self.pool is not None:
            if kind is None:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()

    def encode(self, chunks: Iterator[list[Piece]]) -> Iterator[tuple[np.ndarray, int]]:
        head = list(islice(chunks, POOL_MIN_CHUNKS)) if self.workers > 1 and self.pool is None else []
        if self.workers == 1 or (self.pool is None and len(head) < POOL_MIN_CHUNKS):
            for pieces in _chain(head, chunks):
                yield encode_pieces(self.tok, pieces, self.dtype)
            return
        if self.pool is None:
            self.pool = self._start_pool()
        in_flight: deque = deque()  # at most 2 chunks per worker: bounded memory, workers never idle
        for pieces in _chain(head, chunks):
            if len(in_flight) >= 2 * self.workers:
                yield in_flight.popleft().get()
            in_flight.append(self.pool.apply_async(_worker_encode, (pieces,)))
        while in_flight:
            yield in_flight.popleft().get()

    def _start_pool(self):
        import multiprocessing

        fork = sys.platform.startswith("linux")
        ctx = multiprocessing.get_context("fork" if fork else "spawn")
        args = (self.tok if fork else None, self.tok.kind, self.tok.state(), self.dtype.name, os.getpid())
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            return ctx.Pool(self.workers, _worker_init, args)
        finally:
            if saved is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved


def _chain(head: list, rest: Iterator) -> Iterator:
    yield from head
    head.clear()  # let the buffered chunks go once handed out
    yield from rest


class _ShardWriter:
    """Writes one split's token stream into ``<split>-00000.bin``, … of ≤ ``shard_tokens``
    tokens each; a split that fits one shard ends up as ``<split>.bin``."""

    def __init__(self, folder: Path, split: str, dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, np.dtype(dtype), shard_tokens
        self.shards: list[list] = []  # [file name, tokens]
        self.file = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        while len(tokens):
            if self.file is None:
                name = f"{self.split}-{len(self.shards):05d}.bin"
                self.file = open(self.folder / name, "wb")
                self.shards.append([name, 0])
            take = tokens[: self.shard_tokens - self.shards[-1][1]]
            self.file.write(take)  # not ndarray.tofile: its errors lose the errno (ENOSPC)
            self.shards[-1][1] += len(take)
            tokens = tokens[len(take):]
            if self.shards[-1][1] == self.shard_tokens:
                self._close_file()

    def _close_file(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())  # the shard is on disk before meta.json can say it is
        self.file.close()
        self.file = None

    def close(self) -> list[list]:
        if self.file is not None:
            self._close_file()
        single = self.folder / f"{self.split}.bin"
        if not self.shards:
            single.touch()
            self.shards = [[single.name, 0]]
        elif len(self.shards) == 1:
            os.rename(self.folder / self.shards[0][0], single)
            self.shards[0][0] = single.name
        return self.shards

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _progress_bar(split: str, enabled: bool | None):
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(desc=f"tokenising {split}", unit="B", unit_scale=True, unit_divisor=1000, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True, leave=False)


def _write_split(docs: Iterator[str], encoder: _Encoder, writer: _ShardWriter, chunk_chars: int,
                 progress: bool | None) -> list[list]:
    chunks = chunk_documents(docs, chunk_chars, encoder.tok.kind in CUTTABLE_KINDS)
    bar = _progress_bar(writer.split, progress)
    try:
        for tokens, nbytes in encoder.encode(chunks):
            writer.write(tokens)
            bar.update(nbytes)
        return writer.close()
    finally:
        writer.abort()
        bar.close()


def remove_stale_temp_dirs(folder: Path) -> None:
    """Delete the temporary entries in ``folder`` whose writers died; never a live writer's."""
    now = time.time()
    try:
        candidates = [p for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]
    except OSError:
        return
    for tmp in candidates:
        if writer_is_gone(tmp, TMP_PREFIX, TMP_IDLE_S, now):
            shutil.rmtree(tmp, ignore_errors=True)  # a read-only cache keeps them: still usable


def tokenize_cached(corpus: Corpus, tok: Tokenizer, val_fraction: float, *, workers: int | None = None,
                    progress: bool | None = None, shard_tokens: int | None = None,
                    chunk_chars: int | None = None) -> Path:
    """The cache folder holding ``corpus`` tokenised by ``tok``; tokenises on first use.

    ``workers`` processes encode (default :func:`tokenize_workers`; 1 = in this process);
    ``progress`` shows a bar with MB/s on stderr (default: when stderr is a terminal).
    ``shard_tokens`` (default SHARD_TOKENS) caps the tokens of one file, ``chunk_chars``
    (default CHUNK_CHARS) the characters of one task; the token stream depends on none of
    ``workers``, ``shard_tokens`` and ``chunk_chars``.
    """
    shard_tokens = SHARD_TOKENS if shard_tokens is None else shard_tokens
    chunk_chars = CHUNK_CHARS if chunk_chars is None else chunk_chars
    if shard_tokens < 1 or chunk_chars < 1:
        raise ValueError(f"shard_tokens and chunk_chars must be ≥ 1, got {shard_tokens} and {chunk_chars}")
    workers = tokenize_workers(workers)
    tokens = cache_root() / "tokens"
    remove_stale_temp_dirs(tokens)
    final = tokens / _key(corpus.fingerprint, val_fraction, tok.fingerprint())
    if _usable(final):
        return final
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    with _cache_writing(tokens):
        ensure_dir(tokens)
        tmp = make_temp_dir(tokens, TMP_PREFIX)
        try:
            shards = {}
            with _Encoder(tok, dtype, workers) as encoder:
                for split in SPLITS:
                    writer = _ShardWriter(tmp, split, dtype, shard_tokens)
                    shards[split] = _write_split(corpus.docs(split), encoder, writer, chunk_chars, progress)
            counts = {split: sum(n for _, n in shards[split]) for split in SPLITS}
            if counts["train"] == 0:
                raise DlmError(f"no text found in data '{corpus.name}'")
            meta = {
                "dtype": np.dtype(dtype).name,
                "tokens": counts,
                "shards": {split: [{"file": name, "tokens": n} for name, n in shards[split]] for split in SPLITS},
                "shard_tokens": shard_tokens,
                "corpus": corpus.fingerprint,
                "tokenizer": tok.fingerprint(),
                "vocab_size": tok.vocab_size,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: it makes the entry whole
            fsync_dir(tmp)
            try:
                os.rename(tmp, final)
                fsync_dir(tokens)
            except OSError:  # another process finished the same entry first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


# ---- reading: shards memory-mapped, read lazily -----------------------------------------------

def _usable(entry: Path) -> bool:
    """Whether cache ``entry`` is complete and sound; a damaged one is removed to be rebuilt."""
    if not (entry / "meta.json").is_file():
        return False
    try:
        _read_meta(entry)
        return True
    except DlmError:
        shutil.rmtree(entry, ignore_errors=True)
        return False


def _read_meta(folder: Path) -> tuple[np.dtype, dict[str, list[tuple[str, int]]]]:
    """(dtype, the (file, tokens) shards of each split) from ``meta.json`` of a cache entry,
    checked against its files. An entry without a shard list (older dlm) has ``<split>.bin``."""
    path = folder / "meta.json"
    try:
        meta = json.loads(path.read_text())
        dtype = np.dtype(meta["dtype"])
        counts = {split: int(meta["tokens"][split]) for split in SPLITS}
        if "shards" in meta:
            shards = {split: [(str(s["file"]), int(s["tokens"])) for s in meta["shards"][split]] for split in SPLITS}
        else:
            shards = {split: [(f"{split}.bin", counts[split])] for split in SPLITS}
        for split in SPLITS:
            for name, n in shards[split]:
                if Path(name).name != name or name.startswith(".") or n < 0:
                    raise ValueError(f"bad shard {name!r} of {n} tokens")
        sizes = {name: (folder / name).stat().st_size for split in SPLITS for name, _ in shards[split]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DlmError(f"token cache entry {path} is corrupt ({type(e).__name__}: {e}); delete {folder}") from None
    for split in SPLITS:
        if sum(n for _, n in shards[split]) != counts[split] or not shards[split]:
            raise DlmError(f"token cache entry {folder} is corrupt (the shards of {split} do not add up to "
                           f"{counts[split]} tokens); delete {folder}")
        for name, n in shards[split]:
            if sizes[name] != n * dtype.itemsize:
                raise DlmError(
                    f"token cache entry {folder} is corrupt ({name} has {sizes[name]} bytes, {path} says "
                    f"{n} tokens); delete {folder}"
                )
    return dtype, shards


def open_stream(folder: Path, split: str) -> "np.ndarray | ShardedStream":
    """The token stream of ``split``: a memory-mapped array when it is one file, else a
    :class:`ShardedStream` reading its shards lazily."""
    dtype, shards = _read_meta(folder)
    shards = [(name, n) for name, n in shards[split] if n > 0]
    if not shards:
        return np.zeros(0, dtype=dtype)
    if len(shards) == 1:
        return np.memmap(folder / shards[0][0], dtype=dtype, mode="r", shape=(shards[0][1],))
    return ShardedStream([folder / name for name, _ in shards], [n for _, n in shards], dtype)


def _index_array(key, n: int) -> np.ndarray:
    """Integer positions (negatives from the end) of ``key`` (ints or a bool mask) in range(n)."""
    idx = np.asarray(key)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise IndexError(f"boolean index of shape {idx.shape} for length {n}")
        return np.flatnonzero(idx)
    if idx.size == 0:
        return idx.astype(np.int64)
    if not np.issubdtype(idx.dtype, np.integer):
        raise IndexError(f"only integers, slices and integer or boolean arrays are valid indices, got {idx.dtype}")
    idx = np.where(idx < 0, idx + n, idx).astype(np.int64)
    if idx.min() < 0 or idx.max() >= n:
        raise IndexError(f"index out of range for length {n}")
    return idx


class ShardedStream:
    """A 1-D token stream kept in several shard files, each memory-mapped on first use.

    ``len``, ``shape``, ``dtype``; ``stream[i]``, ``stream[a:b]`` (an array; a view of the
    mapping when it lies in one shard, a copy when it spans shards), ``stream[indices]``;
    ``chunks()`` and ``bincount()`` walk it a bounded piece at a time. ``np.asarray(stream)``
    reads it all into memory: avoid it on a large corpus.
    """

    ndim = 1

    def __init__(self, paths: list[Path], counts: list[int], dtype):
        self.paths = [Path(p) for p in paths]
        self.counts = [int(n) for n in counts]
        self.dtype = np.dtype(dtype)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)  # (S + 1,)
        self._maps: list[np.memmap | None] = [None] * len(self.paths)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    @property
    def size(self) -> int:
        return len(self)

    def __repr__(self) -> str:
        return f"ShardedStream({len(self)} tokens of {self.dtype.name} in {len(self.paths)} shards)"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": [None] * len(self.paths)}  # mappings are made again where unpickled

    def shard(self, s: int) -> np.memmap:
        if self._maps[s] is None:
            self._maps[s] = np.memmap(self.paths[s], dtype=self.dtype, mode="r", shape=(self.counts[s],))
        return self._maps[s]

    def _shard_of(self, i):
        return np.searchsorted(self.offsets, i, side="right") - 1

    def range(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) (0 ≤ start, stop ≤ len)."""
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        first, last = int(self._shard_of(start)), int(self._shard_of(stop - 1))
        parts = []
        for s in range(first, last + 1):
            off = int(self.offsets[s])
            parts.append(np.asarray(self.shard(s)[max(start - off, 0): min(stop - off, self.counts[s])]))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Tokens at positions ``idx`` (any shape, in range)."""
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty(idx.shape, dtype=self.dtype)
        shard = self._shard_of(idx)
        for s in np.unique(shard):
            at = shard == s
            out[at] = self.shard(int(s))[idx[at] - self.offsets[s]]
        return out

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"index {key} out of range for length {n}")
            return self.take(np.array(i))[()]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            return self.range(start, stop) if step == 1 else self.take(np.arange(start, stop, step))
        if isinstance(key, tuple) and len(key) == 1:
            return self[key[0]]
        return self.take(_index_array(key, n))

    def __array__(self, dtype=None, copy=None):
        out = self.range(0, len(self))
        return out if dtype is None else out.astype(dtype)

    def __iter__(self):
        for chunk in self.chunks():
            yield from chunk

    def chunks(self, size: int = 1 << 24) -> Iterator[np.ndarray]:
        """The stream in order, ≤ ``size`` tokens at a time (views of the mappings)."""
        for s in range(len(self.paths)):
            mm = self.shard(s)
            for i in range(0, len(mm), size):
                yield np.asarray(mm[i: i + size])

    def bincount(self, minlength: int = 0) -> np.ndarray:
        """``np.bincount(stream, minlength=minlength)``, a chunk at a time."""
        return token_counts(self, minlength)

    def blocks(self, seq_len: int) -> "ShardedRows":
        return ShardedRows(self, seq_len)


class ShardedRows:
    """The (N, seq_len) rows of consecutive blocks of a :class:`ShardedStream` (the
    incomplete tail dropped), read on indexing: ``rows[i]``, ``rows[a:b]``,
    ``rows[indices]`` give arrays; ``len`` and ``shape`` as for an (N, L) array."""

    ndim = 2

    def __init__(self, stream: ShardedStream, seq_len: int):
        self.stream, self.seq_len = stream, int(seq_len)
        self.dtype = stream.dtype
        self.shape = (len(stream) // self.seq_len, self.seq_len)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedRows({self.shape[0]} × {self.seq_len} of {self.stream!r})"

    def _row(self, i: int) -> np.ndarray:
        return self.stream.range(i * self.seq_len, (i + 1) * self.seq_len)

    def __getitem__(self, key):
        n, L = self.shape
        if isinstance(key, tuple):
            rows = self[key[0]]
            rest = key[1:]
            return rows[rest] if isinstance(key[0], (int, np.integer)) else rows[(slice(None), *rest)]
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"row {key} out of range for {n} rows")
            return self._row(i)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return self.stream.range(start * L, max(stop, start) * L).reshape(-1, L)
            idx = np.arange(start, stop, step)
        else:
            idx = _index_array(key, n)
        out = np.empty((idx.size, L), dtype=self.dtype)
        for j, i in enumerate(idx.ravel()):
            out[j] = self._row(int(i))
        return out.reshape(*idx.shape, L)

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def astype(self, dtype) -> np.ndarray:
        return np.asarray(self, dtype=dtype)


def token_counts(stream, minlength: int = 0, chunk: int = 1 << 24) -> np.ndarray:
    """``np.bincount(stream, minlength=minlength)`` of a token stream (array, memory map or
    :class:`ShardedStream`), ``chunk`` tokens at a time: memory stays bounded (a plain
    ``np.bincount`` converts the whole stream to int64 first)."""
    counts = np.zeros(minlength, dtype=np.int64)
    pieces = stream.chunks(chunk) if isinstance(stream, ShardedStream) else (
        np.asarray(stream).ravel()[i: i + chunk] for i in range(0, np.asarray(stream).size, chunk))
    for piece in pieces:
        c = np.bincount(piece, minlength=minlength)
        if len(c) > len(counts):
            c[: len(counts)] += counts
            counts = c
        else:
            counts[: len(c)] += c
    return counts


def require_blocks(stream, seq_len: int, what: str) -> None:
    if len(stream) < seq_len:
        raise DlmError(f"the {what} split has {len(stream)} tokens, fewer than one sequence of {seq_len}")
