"""Prompt/response rows for instruction fine-tuning (SFT), with the prompt kept clean.

A pairs file is JSON Lines, one example per line, either

    {"prompt": "…", "response": "…"}
    {"messages": [{"role": "user", "content": "…"}, …, {"role": "assistant", "content": "…"}]}

A ``messages`` row is rendered with dlm's chat template (plain text, so every tokenizer,
``char`` included, can encode it): each message but the last becomes ``Role: content`` and
a line break (``System``, ``User``, ``Assistant``, or the role as given, capitalised), then
``Assistant: `` opens the answer; that is the prompt. The last message, which must be the
assistant's, is the response. A ``prompt``/``response`` row is used as it is: the prompt's
tokens, then the response's (put any separator you want at the end of the prompt).

Each example becomes one row of exactly ``seq_len`` tokens (LLaDA, arXiv 2502.09992, §2.3),
with its length without the filling beside it (``PairRows.lengths``: the loader cuts each
batch to its longest row under ``data.sft_length=batch``):

    [prompt tokens][response tokens][end-of-text …]

* the prompt is *clean*: never corrupted, never scored (a prompt that leaves no room for
  a response token is an error naming the row);
* the response and the end-of-text tokens that fill the row are the *target*: corrupted and
  scored like any response token. Scoring the filling end-of-text tokens is what teaches the
  model where to stop: at sampling time it fills the rest of the row with end-of-text once
  the answer is complete, and ``dlm sample`` cuts the text there. (They are not padding:
  padding is neither scored nor attended to, and a model trained that way never learns to
  end.) A response too long for the row is cut at the row's end (no end-of-text then); the
  number of cut rows is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from dlm.data.corpora import BOM, json_line
from dlm.data.tokenizers import check_text
from dlm.errors import DlmError


@dataclass(frozen=True)
class Pair:
    prompt: str
    response: str
    where: str  # "file:line", for messages about this row


def render_messages(messages, where: str) -> tuple[str, str]:
    """(prompt, response) of a ``messages`` row under dlm's chat template."""
    if not isinstance(messages, list) or not messages:
        raise DlmError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DlmError(f"{where}: every message must be an object with string \"role\" and \"content\"")
    if messages[-1]["role"] != "assistant":
        raise DlmError(f"{where}: the last message must be the assistant's (it is the response to learn)")
    prompt = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages[:-1]) + "Assistant: "
    return prompt, messages[-1]["content"]


def parse_row(record, where: str) -> Pair:
    if isinstance(record, dict) and "messages" in record:
        prompt, response = render_messages(record["messages"], where)
    elif isinstance(record, dict) and "prompt" in record and "response" in record:
        prompt, response = record["prompt"], record["response"]
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise DlmError(f"{where}: \"prompt\" and \"response\" must be strings")
    else:
        raise DlmError(f"{where}: a pairs row must be an object with \"prompt\" and \"response\" "
                       f"(or \"messages\"); this file's first row made it a pairs file")
    if not response.strip():
        raise DlmError(f"{where}: the response is empty")
    return Pair(check_text(prompt, f"{where}: the prompt"), check_text(response, f"{where}: the response"), where)


def first_record(path: Path):
    """The first JSON object of a .jsonl file, or None (not JSON Lines, or empty)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip(BOM + " \t\r\n"):
                    return json_line(line.removeprefix(BOM))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return None


def is_pairs_file(path: Path) -> bool:
    """A .jsonl file whose first row has ``prompt`` or ``messages`` holds pairs (a ``text``
    row makes it a text corpus)."""
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    record = first_record(path)
    return isinstance(record, dict) and ("prompt" in record or "messages" in record)


def read_pairs(path: Path) -> list[Pair]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DlmError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise DlmError(f"{path} is not UTF-8 text (invalid byte at offset {e.start})") from None
    pairs = []
    for lineno, line in enumerate(text.removeprefix(BOM).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json_line(line)
        except ValueError:
            raise DlmError(f"{where}: not a JSON object") from None
        pairs.append(parse_row(record, where))
    if not pairs:
        raise DlmError(f"{path} holds no rows")
    return pairs


PAIR_COLUMNS = ({"prompt", "response"}, {"messages"})


def has_pair_columns(columns) -> bool:
    """A table with ``prompt`` and ``response`` columns, or ``messages``, holds pairs."""
    return any(need <= set(columns) for need in PAIR_COLUMNS)


def dataset_pairs(ds, spec: str, val_fraction: float) -> dict[str, list[Pair]]:
    """The pairs of a Hugging Face ``DatasetDict`` with pair columns: its own validation split
    when it has one (``validation``, ``valid`` or ``test``), else every k-th train row."""
    def rows(split: str) -> list[Pair]:
        table = ds[split]
        keep = [c for c in ("prompt", "response", "messages") if c in table.column_names]
        return [parse_row(record, f"{spec} [{split}] row {i}")
                for i, record in enumerate(table.select_columns(keep))]

    val_name = next((n for n in ("validation", "valid", "test") if n in ds), None)
    if val_name is None:
        return split_pairs(rows("train"), val_fraction)
    return {"train": rows("train"), "val": rows(val_name)}


def split_pairs(pairs: list[Pair], val_fraction: float) -> dict[str, list[Pair]]:
    """Every k-th row (k = round(1/val_fraction)) to validation, at least one when there are two."""
    k = max(2, round(1.0 / val_fraction))
    val = [p for i, p in enumerate(pairs) if i % k == k - 1]
    train = [p for i, p in enumerate(pairs) if i % k != k - 1]
    if not val and len(pairs) >= 2:
        val, train = pairs[-1:], pairs[:-1]
    return {"train": train, "val": val}


@dataclass
class PairRows:
    rows: np.ndarray  # (N, L) int64 token ids
    clean: np.ndarray  # (N, L) bool: the prompt
    truncated: int  # rows whose response was cut at the row's end
    lengths: np.ndarray | None = None  # (N,) prompt + response + one end-of-text (at most L): the row without its filling


def encode_pairs(pairs: Iterable[Pair], tokenizer, seq_len: int) -> PairRows:
    """Rows of ``seq_len`` tokens: prompt (clean), response, end-of-text filling (target)."""
    rows, cleans, lengths, truncated = [], [], [], 0
    for pair in pairs:
        p = np.asarray(tokenizer.encode(pair.prompt), dtype=np.int64)
        r = np.asarray(tokenizer.encode(pair.response), dtype=np.int64)
        if len(p) >= seq_len:
            raise DlmError(f"{pair.where}: the prompt is {len(p)} tokens; it must be shorter than the "
                           f"sequence length {seq_len} to leave room for the response")
        if len(r) == 0:
            raise DlmError(f"{pair.where}: the response encodes to no tokens")
        room = seq_len - len(p)
        truncated += len(r) > room
        row = np.full(seq_len, tokenizer.eos_id, dtype=np.int64)
        row[: len(p)] = p
        row[len(p) : len(p) + min(len(r), room)] = r[:room]
        clean = np.zeros(seq_len, dtype=bool)
        clean[: len(p)] = True
        rows.append(row)
        cleans.append(clean)
        lengths.append(min(len(p) + len(r) + 1, seq_len))
    if not rows:
        return PairRows(np.zeros((0, seq_len), np.int64), np.zeros((0, seq_len), bool), 0, np.zeros(0, np.int64))
    return PairRows(np.stack(rows), np.stack(cleans), truncated, np.asarray(lengths, dtype=np.int64))


def pair_texts(pairs: Iterable[Pair]) -> Iterator[str]:
    """The text of each pair, prompt and response joined (what a tokenizer is built from)."""
    for p in pairs:
        yield p.prompt + p.response
