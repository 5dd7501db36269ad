"""Infilling templates: ``[MASK*N]`` marks a hole of N tokens to fill, everything else is
kept. ``"To be, or [MASK*3], that is the question"`` keeps both sides clean and lets a
diffusion model fill the three tokens between them.

The text outside the holes comes back byte for byte: it is not decoded from tokens (a
tokenizer need not round-trip every string) but taken from the template itself, and the
holes' tokens are decoded in between. Any other ``[MASK*`` (``[MASK*-1]``, ``[MASK*abc]``,
an unclosed ``[MASK*3``) is refused, not kept as text: it is a hole mistyped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dlm.errors import DlmError

HOLE = re.compile(r"\[MASK\*(\d+)\]")
# what is left of "[MASK*" once the well-formed holes are cut out: [MASK*-1], [MASK*abc], an unclosed [MASK*3
MALFORMED = re.compile(r"\[MASK\*[^\]]{0,20}\]?")


@dataclass
class Template:
    pieces: list[str]  # text around the holes: len(holes) + 1 pieces
    holes: list[int]  # tokens per hole
    ids: list[int]  # the whole sequence, holes as placeholder ids
    clean: list[bool]  # True outside the holes
    spans: list[tuple[int, int]]  # [start, end) of each hole in ``ids``

    def fill(self, tokenizer, row: list[int]) -> str:
        """The template's text with each hole replaced by the decoded tokens of ``row`` there."""
        out = [self.pieces[0]]
        for (start, end), piece in zip(self.spans, self.pieces[1:]):
            out.append(tokenizer.decode(row[start:end]))
            out.append(piece)
        return "".join(out)


def _hole_sizes(digits: list[str], max_len: int) -> list[int]:
    """Each hole's token count, or one line for a hole longer than the model: decided on the
    digits (a 5,000-digit count would pass Python's int-conversion limit)."""
    sizes = []
    for d in (d.lstrip("0") or "0" for d in digits):
        if len(d) > len(str(max_len)) or int(d) > max_len:
            size = d if len(d) <= 20 else f"{d[:8]}… ({len(d):,} digits)"
            raise DlmError(f"an infill hole of {size} tokens is too long: this model takes at most {max_len}")
        sizes.append(int(d))
    return sizes


def parse_template(text: str, tokenizer, max_len: int) -> Template:
    parts = HOLE.split(text)
    pieces, holes = parts[0::2], _hole_sizes(parts[1::2], max_len)
    bad = next((m for piece in pieces if (m := MALFORMED.search(piece))), None)
    if bad is not None:
        raise DlmError(f"the infill template has a malformed hole {bad.group()!r}: mark each one as "
                       "[MASK*N], N a whole number of tokens")
    if not holes:
        raise DlmError("the infill template has no hole: mark each one as [MASK*N], N the tokens to fill")
    if any(n < 1 for n in holes):
        raise DlmError("an infill hole must be at least 1 token: [MASK*0] fills nothing")
    encoded = [[int(t) for t in tokenizer.encode(piece)] if piece else [] for piece in pieces]
    total = sum(map(len, encoded)) + sum(holes)
    if total > max_len:  # before any placeholder is made: [MASK*1000000000000] is too long, not out of memory
        raise DlmError(f"the infill template is {total} tokens with its holes; this model takes at most {max_len}")
    ids: list[int] = []
    clean: list[bool] = []
    spans: list[tuple[int, int]] = []
    for i, enc in enumerate(encoded):
        ids += enc
        clean += [True] * len(enc)
        if i < len(holes):
            spans.append((len(ids), len(ids) + holes[i]))
            ids += [tokenizer.eos_id] * holes[i]  # placeholders: generated, never read
            clean += [False] * holes[i]
    return Template(pieces, holes, ids, clean, spans)
