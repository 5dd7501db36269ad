"""Sharded, multi-process tokenisation: the same token stream as one process, shards read
lazily, and a killed or failed tokenisation never leaves an entry that looks complete."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import dlm.data.cache as cache
from dlm.config import DataConfig
from dlm.data import TOKENIZERS, BlockLoader, as_blocks, prepare_data
from dlm.data.cache import ShardedRows, ShardedStream, chunk_documents, open_stream, tokenize_cached, token_counts
from dlm.data.corpora import Corpus
from dlm.errors import DlmError
from dlm.evaluate import select_blocks, unigram_references

WORDS = ["the", "a", "Ñandú", "日本", " ", "\n", "\n\n", " \n", "\n ", "\t", "'s", "123", "!!", "\r\n", "x\ny",
         "<|endoftext|>", "\u2028", "  "]


def _docs(seed=0, n=40):
    """Short documents of awkward whitespace, and one long one of many lines (cut into pieces)."""
    rng = random.Random(seed)
    docs = ["".join(rng.choice(WORDS) + rng.choice(["", " ", "z"]) for _ in range(rng.randint(1, 1500)))
            for _ in range(n)]
    docs.insert(n // 2, "".join(f"line {i} of the long one, {rng.random():.3f}\n" for i in range(3000)))
    return docs


DOCS = _docs()


def _corpus(docs, name="c"):
    return Corpus(name, f"test:{name}:{len(docs)}", lambda split: iter(docs if split == "train" else docs[:3]))


def _reference(tok, docs):
    """The single-process definition: each document's tokens, then end-of-text."""
    return np.concatenate([np.append(tok.encode(d), tok.eos_id) for d in docs])


def _tokenize(monkeypatch, root, corpus, tok, **kw):
    monkeypatch.setenv("DLM_CACHE", str(root))
    return tokenize_cached(corpus, tok, 0.05, progress=False, **kw)


def _entries(root):
    tokens = Path(root) / "tokens"
    return sorted(p.name for p in tokens.iterdir()) if tokens.is_dir() else []


@pytest.mark.parametrize("piece_chars", [1, 100, 2048])
def test_chunks_give_back_the_documents(piece_chars):
    for chunk_chars in (1, 50, 777, 10**6):
        out, cur = [], ""
        for chunk in chunk_documents(iter(DOCS), chunk_chars, piece_chars=piece_chars):
            for text, ends in chunk:
                cur += text
                if ends:
                    out.append(cur)
                    cur = ""
        assert out == DOCS
    sizes = [sum(len(t) for t, _ in c) for c in chunk_documents(iter(DOCS), 777)]
    assert max(sizes) < 777 + 2048 + 100  # the long document was cut, not sent whole


@pytest.mark.parametrize("kind", ["char", "bpe", "gpt2"])
def test_workers_and_shards_give_the_single_process_stream(kind, tmp_path, monkeypatch):
    tok = TOKENIZERS.get(kind).build(DOCS, 400)
    want = _reference(tok, DOCS)
    pids_file = tmp_path / "pids"
    encode = cache.encode_pieces

    def logged(*args):
        with open(pids_file, "a") as f:
            f.write(f"{os.getpid()}\n")
        return encode(*args)

    monkeypatch.setattr(cache, "PIECE_CHARS", 300)  # documents cut into many pieces, across tasks
    streams = {}
    for workers in (1, 2):
        if workers == 2:
            monkeypatch.setattr(cache, "encode_pieces", logged)  # forked workers inherit it
        folder = _tokenize(monkeypatch, tmp_path / f"w{workers}", _corpus(DOCS), tok, workers=workers,
                           shard_tokens=3001, chunk_chars=777)
        meta = json.loads((folder / "meta.json").read_text())
        shards = meta["shards"]["train"]
        assert len(shards) > 2 and all(s["tokens"] == 3001 for s in shards[:-1])
        assert sorted(p.name for p in folder.glob("train*.bin")) == [s["file"] for s in shards]
        streams[workers] = open_stream(folder, "train")
        assert isinstance(streams[workers], ShardedStream)
        assert np.array_equal(np.asarray(open_stream(folder, "val")), _reference(tok, DOCS[:3]))
    pids = {int(p) for p in pids_file.read_text().split()}
    assert pids and os.getpid() not in pids  # workers=2 really encoded in other processes
    assert np.array_equal(np.asarray(streams[1]), want)
    assert np.array_equal(np.asarray(streams[2]), want)


def test_lazy_rows_equal_the_in_memory_blocks(tmp_path, monkeypatch):
    tok = TOKENIZERS.get("char").build(DOCS, 0)
    folder = _tokenize(monkeypatch, tmp_path, _corpus(DOCS), tok, workers=1, shard_tokens=1000, chunk_chars=500)
    stream = open_stream(folder, "train")
    full = np.asarray(stream)
    assert isinstance(stream, ShardedStream) and len(stream.paths) > 10
    assert np.array_equal(stream[995:2010], full[995:2010])  # spans three shards
    assert np.array_equal(stream[-7:], full[-7:]) and stream[-1] == full[-1] and stream[1000] == full[1000]
    assert np.array_equal(stream[[5, 999, 1000, 4321, -1]], full[[5, 999, 1000, 4321, -1]])
    assert np.array_equal(stream[10:3000:7], full[10:3000:7])
    assert np.array_equal(token_counts(stream, tok.vocab_size), np.bincount(full, minlength=tok.vocab_size))

    L = 64
    rows, blocks = as_blocks(stream, L), as_blocks(full, L)
    assert isinstance(rows, ShardedRows) and rows.shape == blocks.shape and len(rows) == len(blocks)
    pick = [0, 15, 16, 17, len(blocks) - 1, 3, 3, -2]
    assert np.array_equal(rows[pick], blocks[pick]) and np.array_equal(rows[np.array(pick)], blocks[pick])
    assert np.array_equal(rows[7], blocks[7]) and np.array_equal(rows[3:40], blocks[3:40])
    assert np.array_equal(rows[5:30:4], blocks[5:30:4]) and np.array_equal(rows[[1, 2], 3:9], blocks[[1, 2], 3:9])
    assert np.array_equal(np.asarray(rows), blocks)
    a, b = BlockLoader(rows, 8, seed=1), BlockLoader(blocks, 8, seed=1)
    for _ in range(len(blocks) // 8 + 3):  # past an epoch
        assert (a.next_batch().x0 == b.next_batch().x0).all()
    assert np.array_equal(select_blocks(stream, L, 20 * L), select_blocks(full, L, 20 * L))
    assert unigram_references(tok, stream, blocks[:4]) == unigram_references(tok, full, blocks[:4])


def test_prepare_data_reads_shards_lazily(tmp_path, monkeypatch):
    f = tmp_path / "t.txt"
    f.write_text("".join(f"Line {i}: to be or not to be.\n" for i in range(3000)))
    monkeypatch.setattr(cache, "SHARD_TOKENS", 5000)
    monkeypatch.setattr(cache, "CHUNK_CHARS", 4096)
    monkeypatch.setenv(cache.WORKERS_ENV, "2")
    monkeypatch.setenv("DLM_CACHE", str(tmp_path / "cache"))
    data = prepare_data(DataConfig(data=str(f), tokenizer="byte"))
    assert isinstance(data.train, ShardedStream)
    rows, clean = data.rows("train", 32)
    assert clean is None and isinstance(rows, ShardedRows)
    text = np.frombuffer(f.read_bytes(), dtype=np.uint8)
    assert np.array_equal(np.asarray(data.train)[:-1], text[: len(data.train) - 1]) and data.train[-1] == 256


def test_a_failing_worker_leaves_no_entry(tmp_path, monkeypatch):
    tok = TOKENIZERS.get("char").build(DOCS, 0)
    encode, calls = cache.encode_pieces, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:  # in each forked worker: its third chunk
            raise RuntimeError("worker failed")
        return encode(*args)

    monkeypatch.setattr(cache, "encode_pieces", failing)
    with pytest.raises(RuntimeError, match="worker failed"):
        _tokenize(monkeypatch, tmp_path, _corpus(DOCS), tok, workers=2, shard_tokens=2000, chunk_chars=500)
    assert _entries(tmp_path) == []  # the temporary folder went with the failure
    monkeypatch.setattr(cache, "encode_pieces", encode)
    folder = _tokenize(monkeypatch, tmp_path, _corpus(DOCS), tok, workers=2, shard_tokens=2000, chunk_chars=500)
    assert np.array_equal(np.asarray(open_stream(folder, "train")), _reference(tok, DOCS))


KILLED = """
import sys, time
import dlm.data.cache as cache
from dlm.data.corpora import load_corpus
from dlm.data.tokenizers import TOKENIZERS

encode = cache.encode_pieces
def slow(*args):
    time.sleep(0.05)  # keeps the run going long enough to be killed in the middle
    return encode(*args)
cache.encode_pieces = slow
corpus = load_corpus(sys.argv[1], 0.05)
tok = TOKENIZERS.get("char").from_state({"chars": sys.argv[2].split(",")})
cache.tokenize_cached(corpus, tok, 0.05, workers=2, shard_tokens=20000, chunk_chars=4000, progress=False)
print("finished", flush=True)
"""


def _children(pid):
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_tokenisation_leaves_nothing_complete_and_restarts_cleanly(tmp_path, monkeypatch):
    data = tmp_path / "docs"
    data.mkdir()
    docs = _docs(seed=1, n=60)
    for i, doc in enumerate(docs):  # no .jsonl: every file is one document, no line of it dropped
        (data / f"{i:03d}.txt").write_text(doc)
    chars = sorted(set("".join(docs)) - {","})
    root = tmp_path / "cache"
    env = {**os.environ, "DLM_CACHE": str(root)}
    # no `if __name__ == "__main__"` guard in the script: forked workers do not re-run it
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(data), ",".join(chars)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tokens = root / "tokens"
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            workers = _children(proc.pid) or workers
            if len(list(tokens.glob(".tmp-*/train-0000[2-9].bin"))) >= 1:
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()
        assert len(workers) == 2
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [p.name.startswith(".tmp-") for p in tokens.iterdir()] == [True]  # nothing looks complete
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{w}").exists() for w in workers), "orphaned workers outlived their parent"

    from dlm.data.corpora import load_corpus

    monkeypatch.setenv("DLM_CACHE", str(root))
    corpus = load_corpus(str(data), 0.05)
    tok = TOKENIZERS.get("char").from_state({"chars": chars})
    folder = tokenize_cached(corpus, tok, 0.05, workers=2, shard_tokens=20000, chunk_chars=4000, progress=False)
    assert [p.name for p in tokens.iterdir()] == [folder.name]  # the dead writer's folder is gone
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(open_stream(folder, split)), _reference(tok, list(corpus.docs(split))))


def test_an_entry_of_the_older_single_file_layout_still_loads(tmp_path, monkeypatch):
    f = tmp_path / "t.txt"
    f.write_text("An entry written before shards existed.\n" * 200)
    monkeypatch.setenv("DLM_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(data=str(f), tokenizer="char")
    first = prepare_data(cfg)
    entry = Path(first.train.filename).parent
    meta = json.loads((entry / "meta.json").read_text())
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    old = {k: v for k, v in meta.items() if k not in ("shards", "shard_tokens")}
    (entry / "meta.json").write_text(json.dumps(old))

    def no_encoding(*args):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(cache, "encode_pieces", no_encoding)
    again = prepare_data(cfg)
    assert isinstance(again.train, np.memmap) and np.array_equal(again.train, first.train)
    assert np.array_equal(again.val, first.val)


def test_a_damaged_shard_is_tokenised_again(tmp_path, monkeypatch):
    tok = TOKENIZERS.get("char").build(DOCS, 0)
    kw = dict(workers=1, shard_tokens=4000, chunk_chars=1000)
    folder = _tokenize(monkeypatch, tmp_path, _corpus(DOCS), tok, **kw)
    shard = folder / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DlmError, match="train-00001.bin has 100 bytes"):
        open_stream(folder, "train")
    folder = _tokenize(monkeypatch, tmp_path, _corpus(DOCS), tok, **kw)
    assert np.array_equal(np.asarray(open_stream(folder, "train")), _reference(tok, DOCS))


def test_workers_setting(monkeypatch):
    monkeypatch.setenv(cache.WORKERS_ENV, "3")
    assert cache.tokenize_workers() == 3 and cache.tokenize_workers(1) == 1
    monkeypatch.setenv(cache.WORKERS_ENV, "many")
    with pytest.raises(DlmError, match="DLM_TOKENIZE_WORKERS must be a whole number"):
        cache.tokenize_workers()
    monkeypatch.delenv(cache.WORKERS_ENV)
    assert cache.tokenize_workers() >= 1
