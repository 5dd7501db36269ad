import json
import time

import numpy as np
import pytest

from dlm.config import DataConfig
from dlm.data import TOKENIZERS, BlockLoader, as_blocks, prepare_data
from dlm.data.cache import tokenize_cached
from dlm.data.corpora import load_corpus
from dlm.errors import DlmError

TEXT = "Shall I compare thee to a summer's day?\nThou art more lovely — and more temperate: ñ, 日本.\n"


def build(kind, docs=(TEXT * 20,), vocab=300):
    return TOKENIZERS.get(kind).build(list(docs), vocab)


@pytest.mark.parametrize("kind", ["char", "byte", "bpe", "gpt2"])
def test_roundtrip_and_byte_counts(kind):
    tok = build(kind)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.token_bytes()[ids].sum() == len(TEXT.encode("utf-8"))
    assert tok.token_bytes()[tok.eos_id] == 0
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"


@pytest.mark.parametrize("kind", ["char", "byte", "bpe", "gpt2"])
def test_state_rebuilds_the_same_tokenizer(kind, tmp_path):
    from dlm.data import load_tokenizer

    tok = build(kind)
    tok.save(tmp_path / "tok.json")
    again = load_tokenizer(tmp_path / "tok.json")
    assert again.vocab_size == tok.vocab_size
    assert np.array_equal(again.encode(TEXT), tok.encode(TEXT))
    assert again.fingerprint() == tok.fingerprint()


def test_gpt2_is_the_real_gpt2():
    tok = build("gpt2")
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    assert tok.encode("Hello world").tolist() == [15496, 995]


def test_char_tokenizer_maps_unseen_characters_to_unk():
    tok = build("char", docs=("abc",))
    assert tok.encode("abz").tolist() == [0, 1, tok.unk_id]


def test_builtin_corpus_split_is_deterministic_and_disjoint():
    c = load_corpus("shakespeare", 0.05)
    train, val = list(c.docs("train")), list(c.docs("val"))
    assert len(train) + len(val) == 42 and len(val) == 2  # 42 works: every 20th goes to validation
    assert not set(train) & set(val)
    assert list(load_corpus("shakespeare", 0.05).docs("val")) == val


def test_single_file_is_split_at_its_tail(tmp_path):
    lines = [f"line {i} of the only document" for i in range(1000)]
    f = tmp_path / "one.txt"
    f.write_text("\n".join(lines) + "\n")
    c = load_corpus(str(f), 0.1)
    (train,), (val,) = list(c.docs("train")), list(c.docs("val"))
    assert train + val == f.read_text()
    assert val.startswith("line 9") and len(val) == pytest.approx(0.1 * len(f.read_text()), rel=0.05)


def test_folder_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first file\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "doc b1"}) + "\n" + json.dumps({"text": "doc b2"}) + "\n")
    (tmp_path / ".hidden").write_text("\xff not read")
    c = load_corpus(str(tmp_path), 0.05)
    train = list(c.docs("train"))
    assert [d[:5] for d in train] == ["first", "doc b", "doc b"]  # sorted files, hidden ones skipped


@pytest.mark.parametrize(
    "content,message",
    [(b"", "is empty"), (b"caf\xe9\n", "not UTF-8"), (b"   \n\n", "no text")],
)
def test_bad_local_data(tmp_path, content, message):
    f = tmp_path / "x.txt"
    f.write_bytes(content)
    with pytest.raises(DlmError, match=message):
        prepare_data(DataConfig(data=str(f), tokenizer="byte"))


def test_unknown_data_name():
    with pytest.raises(DlmError, match="not a file, a folder or a known corpus"):
        load_corpus("no-such-corpus-or-file")


def test_tokenised_once_then_memory_mapped(tmp_path, monkeypatch):
    f = tmp_path / "t.txt"
    f.write_text(TEXT * 200)
    cfg = DataConfig(data=str(f), tokenizer="char")
    first = prepare_data(cfg)
    assert isinstance(first.train, np.memmap)
    calls = []
    monkeypatch.setattr(type(first.tokenizer), "encode_batch", lambda self, texts: calls.append(1))
    second = prepare_data(cfg)
    assert not calls  # the second run read the cache: nothing was tokenised again
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)
    # documents are separated by end-of-text
    assert first.train[-1] == first.tokenizer.eos_id


def test_block_loader_resumes_exactly():
    blocks = as_blocks(np.arange(10_000, dtype=np.uint16), 16)
    a = BlockLoader(blocks, 8, seed=3)
    seen = [a.next_batch().x0 for _ in range(100)]  # crosses epoch boundaries (625 blocks / 8)
    b = BlockLoader(blocks, 8, seed=3)
    for _ in range(37):
        b.next_batch()
    c = BlockLoader(blocks, 8, seed=3)
    c.load_state_dict(b.state_dict())
    assert all((c.next_batch().x0 == s).all() for s in seen[37:])
    assert seen[0].shape == (8, 16) and seen[0].dtype.is_floating_point is False


def test_hf_dataset_from_a_local_folder(tmp_path):
    pytest.importorskip("datasets")
    d = tmp_path / "ds"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps({"text": f"train document {i}"}) + "\n" for i in range(50)))
    (d / "validation.jsonl").write_text("".join(json.dumps({"text": f"held out {i}"}) + "\n" for i in range(5)))
    c = load_corpus(f"hf:{d}")
    assert list(c.docs("val")) == [f"held out {i}" for i in range(5)]
    assert len(list(c.docs("train"))) == 50
    data = prepare_data(DataConfig(data=f"hf:{d}", tokenizer="byte"))
    assert len(data.val) == sum(len(f"held out {i}") + 1 for i in range(5))


def test_hf_dataset_offline_fails_fast_and_clearly(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-hf-home" / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(DlmError, match="not in the local Hugging Face cache"):
        load_corpus("wikitext-103")
    assert time.monotonic() - start < 20


def test_hf_dataset_with_prompt_response_columns_is_pairs(tmp_path):
    """A Hugging Face dataset (here a local folder) with prompt/response or messages columns
    gives prompt/response rows with a clean prompt, its own validation split kept."""
    pytest.importorskip("datasets")
    d = tmp_path / "pairs"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps({"prompt": f"Q{i}: ", "response": f"answer {i}"}) + "\n"
                                           for i in range(20)))
    (d / "validation.jsonl").write_text("".join(json.dumps({"prompt": "Q: ", "response": f"held {i}"}) + "\n"
                                                for i in range(3)))
    data = prepare_data(DataConfig(data=f"hf:{d}", tokenizer="byte", seq_len=24))
    rows, clean = data.rows("val", 24)
    assert rows.shape == (3, 24) and clean[:, :3].all() and not clean[:, 3:].any()
    assert bytes(rows[0, 3:3 + len("held 0")].astype(np.uint8)).decode() == "held 0"
    assert (rows[0, 3 + len("held 0"):] == data.tokenizer.eos_id).all()  # filled with end-of-text
    m = tmp_path / "chat"
    m.mkdir()
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (m / "train.jsonl").write_text("".join(json.dumps({"messages": msgs}) + "\n" for _ in range(10)))
    data = prepare_data(DataConfig(data=f"hf:{m}", tokenizer="byte", seq_len=32))
    rows, clean = data.rows("train", 32)
    prompt = "User: hi\nAssistant: "
    assert bytes(rows[0, :len(prompt)].astype(np.uint8)).decode() == prompt and clean[0].sum() == len(prompt)
