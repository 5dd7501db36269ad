"""Text corpora: the built-in default, local files and folders, Hugging Face datasets.

A corpus yields documents for a ``train`` and a ``val`` split. The split is deterministic:

* a source with its own validation split (wikitext, lm1b) keeps it;
* a source of many documents (≥ 2 / val_fraction) sends every k-th document to
  validation, k = round(1 / val_fraction);
* a source of few documents (a single file, the 42 works of the built-in Shakespeare)
  sends the last ``val_fraction`` of every document, cut at a line break, to validation.

Nothing is read until a split is iterated, and each corpus has a ``fingerprint`` that keys
the token cache: for local files a hash of their content (streamed, 1 MiB at a time), so
a file edited with its size and modification time kept (``cp -p``, ``rsync -t``) is
tokenised again; for the built-in corpus the packaged file's hash; for a hub dataset its
name. ``data_identity`` shortens it to what a run stores to notice changed data on resume.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from dlm.data.sources import SOURCES
from dlm.data.tokenizers import check_text
from dlm.errors import DlmError

BUILTIN = {"shakespeare": Path(__file__).parent / "builtin" / "shakespeare.jsonl.gz"}

# Hugging Face datasets reachable by a short name: (repository, config, text column, concat rows)
HF_ALIASES: dict[str, tuple[str, str | None, str, bool]] = {
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-raw-v1", "text", True),
    "wikitext-2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "text", True),
    "openwebtext": ("Skylion007/openwebtext", None, "text", False),
    "lm1b": ("dvruette/lm1b", None, "text", False),
    "text8": ("afmck/text8", None, "text", True),
}
HUB_HOST = "huggingface.co"
HASH_CHUNK = 1 << 20


@dataclass
class Corpus:
    name: str
    fingerprint: str
    docs: Callable[[str], Iterator[str]]  # split name ("train" | "val") → documents


def content_hash(files: list[Path], root: Path) -> str:
    """blake2b over the files' names (relative to ``root``) and contents, read 1 MiB at a time."""
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        one = hashlib.blake2b(digest_size=16)
        try:
            with open(f, "rb") as fh:
                while chunk := fh.read(HASH_CHUNK):
                    one.update(chunk)
        except OSError as e:
            raise DlmError(f"cannot read {f}: {e.strerror}") from None
        h.update(f"{f.relative_to(root) if f != root else f.name}\0{one.hexdigest()}\n".encode())
    return h.hexdigest()


def data_identity(fingerprint: str) -> str:
    """A short string (16 hex digits) that changes whenever the data behind ``fingerprint``
    (a ``Corpus.fingerprint``, or the pairs' fingerprint) does: what a run stores."""
    return hashlib.sha1(fingerprint.encode()).hexdigest()[:16]


def check_data_identity(saved: str | None, current: str | None, path: str) -> None:
    """Refuse to resume a run on data other than the data it started on.

    ``saved`` is what the run stored when it started, ``current`` the identity of the data
    found now; a run that stored none (older dlm) is not checked.
    """
    if saved is not None and current is not None and saved != current:
        raise DlmError(
            f"the training data {path} changed since this run started (content hash {saved}, now {current}): "
            "resume would train on different data; start a new run or restore the file"
        )


def _tail_split(doc: str, val_fraction: float) -> tuple[str, str]:
    cut = int(len(doc) * (1.0 - val_fraction))
    newline = doc.rfind("\n", 0, cut)
    if newline > cut - 2000 and newline > 0:  # prefer a line break close to the cut
        cut = newline + 1
    return doc[:cut], doc[cut:]


def split_docs(all_docs: Callable[[], Iterator[str]], count: int, val_fraction: float):
    """The deterministic train/val rule of this module, for a source of ``count`` documents."""
    k = max(2, round(1.0 / val_fraction))
    by_document = count >= 2 * k

    def docs(split: str) -> Iterator[str]:
        for i, doc in enumerate(all_docs()):
            if by_document:
                if (i % k == k - 1) == (split == "val"):
                    yield doc
            else:
                head, tail = _tail_split(doc, val_fraction)
                part = tail if split == "val" else head
                if part.strip():
                    yield part

    return docs


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DlmError(f"cannot read {path}: {e.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DlmError(f"{path} is not UTF-8 text (invalid byte at offset {e.start})") from None


BOM = "\ufeff"  # a UTF-8 byte-order mark some editors put first; not part of a JSON Lines file's first row


def json_line(line: str):
    """``json.loads(line)``, nesting too deep for the parser included among the ValueErrors of a
    line that is not JSON (``"[" * 200000`` overflows Python's stack)."""
    try:
        return json.loads(line)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _file_docs(path: Path) -> Iterator[str]:
    text = _read_text(path)
    if path.suffix != ".jsonl":
        if text.strip():
            yield text
        return
    for lineno, line in enumerate(text.removeprefix(BOM).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json_line(line)
            doc = record["text"]
        except (ValueError, KeyError, TypeError):
            raise DlmError(f"{path}:{lineno}: a .jsonl line must be an object with a \"text\" field") from None
        if isinstance(doc, str) and doc.strip():
            yield check_text(doc, f"{path}:{lineno}: the text")


def _local_corpus(path: Path, val_fraction: float) -> Corpus:
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DlmError(f"data folder {path} holds no files")
    else:
        files = [path]
    if sum(f.stat().st_size for f in files) == 0:
        raise DlmError(f"data {path} is empty")

    def all_docs() -> Iterator[str]:
        for f in files:
            yield from _file_docs(f)

    # counting documents needs a read of .jsonl files only; plain files are one document each
    count = sum(1 for _ in all_docs()) if any(f.suffix == ".jsonl" for f in files) else len(files)
    if count == 0:
        raise DlmError(f"no text found in {path}")
    return Corpus(str(path), f"local:{content_hash(files, path)}", split_docs(all_docs, count, val_fraction))


def _builtin_corpus(name: str, val_fraction: float) -> Corpus:
    path = BUILTIN[name]

    def all_docs() -> Iterator[str]:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]

    count = sum(1 for _ in all_docs())
    return Corpus(name, f"builtin:{name}:{content_hash([path], path)}", split_docs(all_docs, count, val_fraction))


def _source_corpus(name: str, val_fraction: float) -> Corpus:
    """A synthetic source of known entropy rate (``dlm.data.sources``): one generated document."""
    source = SOURCES.get(name)
    return Corpus(name, source.fingerprint, split_docs(lambda: iter([source.text()]), 1, val_fraction))


def hub_reachable(timeout: float = 3.0) -> bool:
    host = os.environ.get("HF_ENDPOINT", f"https://{HUB_HOST}").split("://")[-1].split("/")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def hf_spec(spec: str) -> tuple[str, str | None, str, bool]:
    """(repository or local folder, config, text column, concatenate rows) of ``hf:…`` or an alias."""
    if spec in HF_ALIASES:
        return HF_ALIASES[spec]
    rest = spec[3:]
    repo, _, config = rest.partition(":") if not Path(rest).exists() else (rest, "", "")
    return repo, config or None, "text", False


def load_hf_dataset(spec: str):
    """The ``datasets.DatasetDict`` of ``spec`` (``hf:REPO[:CONFIG]``, ``hf:/local/folder`` or an
    alias), offline when the hub cannot be reached; one line when it cannot be loaded."""
    repo, config, _, _ = hf_spec(spec)
    try:
        import datasets
    except ImportError:
        raise DlmError(f"data '{spec}' needs the Hugging Face datasets package: pip install 'dlm[hf]'") from None

    local = Path(repo).exists()
    offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    if not local and not offline and not hub_reachable():
        offline = True  # only a cached copy can work now; say so clearly if there is none
    if offline and not local:
        datasets.config.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        ds = datasets.load_dataset(repo, config)
    except Exception as e:  # datasets raises many types; all mean "not loadable here"
        if offline and not local:
            raise DlmError(
                f"dataset '{spec}' ({repo}) is not in the local Hugging Face cache and the hub "
                f"is not reachable (offline); download it on a connected machine or pass a local path"
            ) from None
        raise DlmError(f"cannot load dataset '{spec}': {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if "train" not in ds:
        raise DlmError(f"dataset '{spec}' has no train split (it has: {', '.join(ds)})")
    return ds


def hf_fingerprint(spec: str) -> str:
    """What keys a Hugging Face dataset's token cache: its name, or a local folder's content."""
    repo, config, column, concat = hf_spec(spec)
    local = Path(repo).exists()
    fp = f"hf:{Path(repo).resolve() if local else repo}:{config}:{column}:{concat}"
    if local:
        fp += ":" + content_hash(sorted(p for p in Path(repo).rglob("*") if p.is_file()), Path(repo))
    return fp


def _hf_corpus(spec: str, val_fraction: float) -> Corpus:
    """``hf:REPO[:CONFIG]``, a local dataset folder after ``hf:``, or an alias name."""
    _, _, column, concat = hf_spec(spec)
    ds = load_hf_dataset(spec)

    val_name = next((n for n in ("validation", "valid", "test") if n in ds), None)

    def rows(split_name: str) -> Iterator[str]:
        table = ds[split_name]
        col = column if column in table.column_names else next(
            (c for c in table.column_names if table.features[c].dtype == "string"), None
        )
        if col is None:
            raise DlmError(f"dataset '{spec}' has no text column")
        if concat:
            text = "".join(table[col])
            if text.strip():
                yield text
            return
        for batch in table.iter(batch_size=1024):  # streams from the memory-mapped Arrow files
            for doc in batch[col]:
                if doc and doc.strip():
                    yield doc

    if val_name is not None:
        def docs(split: str) -> Iterator[str]:
            return rows("train" if split == "train" else val_name)
    else:
        docs = split_docs(lambda: rows("train"), len(ds["train"]) if not concat else 1, val_fraction)
    return Corpus(spec, hf_fingerprint(spec), docs)


def load_corpus(spec: str, val_fraction: float = 0.05) -> Corpus:
    if not 0.0 < val_fraction <= 0.5:
        raise DlmError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    if not spec:
        raise DlmError("no data given")
    if spec in BUILTIN:
        return _builtin_corpus(spec, val_fraction)
    if spec in SOURCES:
        return _source_corpus(spec, val_fraction)
    if spec.startswith("hf:") or spec in HF_ALIASES:
        return _hf_corpus(spec, val_fraction)
    path = Path(spec).expanduser()
    if path.exists():
        return _local_corpus(path, val_fraction)
    names = ", ".join([*BUILTIN, *SOURCES.names(), *HF_ALIASES])
    raise DlmError(f"data '{spec}' is not a file, a folder or a known corpus ({names}, or hf:REPO[:CONFIG])")
