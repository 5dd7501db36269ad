"""Infilling templates: ``[MASK*N]`` marks a hole of N tokens to fill, everything else is
kept. ``"To be, or [MASK*3], that is the question"`` keeps both sides clean and lets a
diffusion model fill the three tokens between them.

The text outside the holes comes back byte for byte: it is not decoded from tokens (a
tokenizer need not round-trip every string) but taken from the template itself, and the
holes' tokens are decoded in between.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dlm.errors import DlmError

HOLE = re.compile(r"\[MASK\*(\d+)\]")


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


def parse_template(text: str, tokenizer, max_len: int) -> Template:
    parts = HOLE.split(text)
    pieces, holes = parts[0::2], [int(n) for n in parts[1::2]]
    if not holes:
        raise DlmError("the infill template has no hole: mark each one as [MASK*N], N the tokens to fill")
    if any(n < 1 for n in holes):
        raise DlmError("an infill hole must be at least 1 token: [MASK*0] fills nothing")
    ids: list[int] = []
    clean: list[bool] = []
    spans: list[tuple[int, int]] = []
    for i, piece in enumerate(pieces):
        if piece:
            enc = [int(t) for t in tokenizer.encode(piece)]
            ids += enc
            clean += [True] * len(enc)
        if i < len(holes):
            spans.append((len(ids), len(ids) + holes[i]))
            ids += [tokenizer.eos_id] * holes[i]  # placeholders: generated, never read
            clean += [False] * holes[i]
    if len(ids) > max_len:
        raise DlmError(f"the infill template is {len(ids)} tokens with its holes; this model takes at most {max_len}")
    return Template(pieces, holes, ids, clean, spans)
