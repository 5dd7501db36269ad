"""Built-in instruction tasks: prompt/response pairs made from data shipped with dlm, so
that fine-tuning runs offline on a fresh machine. Each task is a function
``(val_fraction) -> {"train": [Pair, …], "val": [Pair, …]}``, registered by the name given
to ``--data``.

``shakespeare-next-speaker`` — who speaks next?
-----------------------------------------------

Made from the built-in Shakespeare corpus (``load_corpus("shakespeare", val_fraction)``),
whose speeches read ``SPEAKER.\\nline\\nline\\n\\nNEXT SPEAKER.\\nline…``. A *speech* is a
block (text between blank lines) whose first line is a speaker line — capitals ending
with a period, such as ``JULIET.`` or ``FIRST LORD.`` (act and scene headings, prologues and
epilogues excluded) — followed by at least one line of text. At every turn where three
speeches A, B, C follow one another with nothing between them (no stage direction, no
scene break), one example is

    prompt   = A's speaker line + A's last ≤ 2 lines + "\\n\\n"
             + B's speaker line + B's last ≤ 2 lines + "\\n\\n"
    response = C's speaker line, e.g. "JULIET."

in the corpus's own formatting (indentation and inline stage directions kept), each
speech line cut to at most ``MAX_LINE_CHARS`` (60) characters at a word boundary, so that
every prompt fits a 128-token row of the quickstart's BPE tokenizer with room to spare
(prompts: 45 tokens on average, 87 at most; responses 2–10 tokens, then the end-of-text
that stops them). Train pairs come from the corpus's train text, val pairs from its val text:
with the default ``val_fraction`` 0.05 the split is by play, and the val plays are
*Macbeth* and *Twelfth Night*, never seen by a model pretrained with the quickstart.
Plays whose speaker lines have another form contribute nothing (Hamlet, King Lear and Romeo
and Juliet write ``Ham.``, A Midsummer Night's Dream has no period, most of Love's Labour's
Lost a trailing space), nor do the poems.

Size (val_fraction 0.05): 18,226 train turns and 1,175 val turns exist; the task keeps
``TRAIN_CAP`` = 4,000 train and ``VAL_CAP`` = 500 val pairs, spread evenly over the turns in
corpus order (deterministic: the same pairs on every machine). The val pairs come in corpus
order too, *Macbeth* first, so the first N of them are a fixed, reproducible subset.

Chance-level references on the 500 val pairs (exact match of the speaker line; computed by
``speaker_baselines``, checked by ``tests/test_sft.py``):

* "the next speaker is the speaker two turns back" (C = A, dialogue alternating): **71.6%**;
* "the most frequent speaker" of the train pairs, always (``KING.``): **0.0%** — no
  character of the val plays is called that;
* "the most frequent speaker" of the val pairs themselves, always (``SIR TOBY.``, an
  oracle constant that peeks at the val answers): **9.8%**.

On the first 400 val pairs (what ``benchmarks/sft`` scores): 72.0%, 0.0% and 10.25%
(``MACBETH.``). Two turns back is the bar a model has to clear: most turns in a play are
two people answering each other.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache

from dlm.data.pairs import Pair
from dlm.registry import Registry

PAIR_TASKS: Registry = Registry("built-in instruction task")

# ---- shakespeare-next-speaker ------------------------------------------------------------------

MAX_LINE_CHARS = 60  # a speech line longer than this is cut at a word boundary
LINES_PER_SPEECH = 2  # the last lines of each of the two speeches in the prompt
TRAIN_CAP = 4000
VAL_CAP = 500

_SPEAKER = re.compile(r"[A-Z][A-Z'&\- ]*[A-Z]\.")  # "JULIET.", "FIRST LORD.", "SIR TOBY." (no inner period)
_HEADING = re.compile(r"(ACT|SCENE|PROLOGUE|EPILOGUE|THE PROLOGUE|THE EPILOGUE|INDUCTION)\b")


def is_speaker_line(line: str) -> bool:
    """A speaker line of the built-in corpus: capitals ending with a period, not a heading."""
    return bool(_SPEAKER.fullmatch(line)) and not _HEADING.match(line)


def _cut_line(line: str, limit: int = MAX_LINE_CHARS) -> str:
    """``line`` itself, or its first ≤ ``limit`` characters ending at a word boundary."""
    if len(line) <= limit:
        return line
    head = line[:limit]
    space = head.rstrip().rfind(" ")
    return head[:space].rstrip() if space > limit // 2 else head.rstrip()


def _speech(block: str) -> tuple[str, str] | None:
    """(speaker line, the speech's last lines, cut) of a speech block, or None."""
    lines = block.split("\n")
    if len(lines) < 2 or not is_speaker_line(lines[0]):
        return None
    body = [line for line in lines[1:] if line.strip()]
    if not body:
        return None
    return lines[0], "\n".join(_cut_line(line) for line in body[-LINES_PER_SPEECH:])


def speaker_turns(doc: str) -> list[tuple[Pair, str]]:
    """Every (pair, speaker two turns back) of one play, in order (``where`` is left to the caller)."""
    speeches = [_speech(block) for block in doc.split("\n\n")]
    turns = []
    for a, b, c in zip(speeches, speeches[1:], speeches[2:]):
        if a and b and c:
            prompt = f"{a[0]}\n{a[1]}\n\n{b[0]}\n{b[1]}\n\n"
            turns.append((Pair(prompt, c[0], ""), a[0]))
    return turns


def _spread(items: list, cap: int) -> list:
    """≤ ``cap`` items spread evenly over ``items``, in order (deterministic)."""
    if len(items) <= cap:
        return items
    return [items[(i * len(items)) // cap] for i in range(cap)]


@lru_cache(maxsize=4)
def _next_speaker_split(val_fraction: float) -> dict[str, tuple[tuple[Pair, str], ...]]:
    from dlm.data.corpora import load_corpus

    corpus = load_corpus("shakespeare", val_fraction)
    out = {}
    for split, cap in (("train", TRAIN_CAP), ("val", VAL_CAP)):
        turns = [t for doc in corpus.docs(split) for t in speaker_turns(doc)]
        kept = _spread(turns, cap)
        out[split] = tuple((Pair(p.prompt, p.response, f"shakespeare-next-speaker:{split}:{i}"), back)
                           for i, (p, back) in enumerate(kept))
    return out


@PAIR_TASKS.register("shakespeare-next-speaker")
def shakespeare_next_speaker(val_fraction: float) -> dict[str, list[Pair]]:
    """Who speaks next, from the two speeches before the turn (see the module docstring)."""
    return {split: [p for p, _ in turns] for split, turns in _next_speaker_split(val_fraction).items()}


def speaker_baselines(val_fraction: float = 0.05, limit: int | None = None) -> dict:
    """Exact-match accuracy of the chance-level heuristics on the first ``limit`` (default:
    all) val pairs of ``shakespeare-next-speaker``: the speaker two turns back, the most
    frequent train response, and the most frequent val response (an oracle constant)."""
    splits = _next_speaker_split(val_fraction)
    val = splits["val"][:limit] if limit else splits["val"]
    train_top = Counter(p.response for p, _ in splits["train"]).most_common(1)[0][0]
    val_top = Counter(p.response for p, _ in val).most_common(1)[0][0]
    n = len(val)
    return {
        "pairs": n,
        "two_turns_back": sum(p.response == back for p, back in val) / n,
        "most_frequent_train": sum(p.response == train_top for p, _ in val) / n,
        "most_frequent_train_speaker": train_top,
        "most_frequent_val": sum(p.response == val_top for p, _ in val) / n,
        "most_frequent_val_speaker": val_top,
    }
