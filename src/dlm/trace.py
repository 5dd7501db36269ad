"""``dlm sample --trace FILE``: the sampling trajectory, one frame per step, as a picture.

The frames are the states every sampler records through its trace hook
(:func:`dlm.samplers.base.recording`): the start (all [MASK], or uniform noise, with the
prompt or the template's text in place) and the state after every step, the last one being
the returned sample. Each token is coloured by the step at which it last changed (early
blue → late red), the given tokens (a prompt, the text around a hole) grey, masks shown as
masks, positions the autoregressive sampler has not reached yet as dotted gaps.

Formats, by the file's extension (:data:`FORMATS`):

* ``.html``: one self-contained page — the data, the CSS and the JavaScript inline, nothing
  fetched — with a slider over the steps and a play button (``FILE.html#N`` opens at step N);
* ``.gif``: an animation, one frame per step (Pillow, which matplotlib brings: the
  ``bench`` and ``dev`` extras).
"""

from __future__ import annotations

import html
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dlm.errors import DlmError
from dlm.fsio import temp_name, writing
from dlm.registry import Registry
from dlm.samplers.base import UNSET

MASK, GAP = -1, -2  # a trace's cells: a mask (an id outside the data vocabulary), a position not reached yet


@dataclass
class Trace:
    """``frames`` (F, B, L): per frame, index into ``texts`` (MASK, GAP); ``clean`` (B, L)."""

    frames: torch.Tensor
    clean: torch.Tensor
    texts: list[str]

    @property
    def last_changed(self) -> torch.Tensor:
        """(F, B, L): the frame at which each cell last changed, as of each frame (0: never)."""
        out = torch.zeros_like(self.frames)
        for f in range(1, len(self.frames)):
            moved = self.frames[f] != self.frames[f - 1]
            out[f] = torch.where(moved, f, out[f - 1])
        return out


def build_trace(frames: list[torch.Tensor], clean: torch.Tensor, tokenizer) -> Trace:
    """A :class:`Trace` of recorded (B, L) id states; ids outside the tokenizer's vocabulary
    ([MASK], any absorbing state) become MASK, UNSET becomes GAP."""
    if not frames:
        raise DlmError("the sampler recorded no state to trace")
    ids = torch.stack(frames)  # (F, B, L)
    V = tokenizer.vocab_size
    seen = sorted({int(i) for i in ids.unique().tolist() if 0 <= i < V})
    index = torch.full((V,), MASK, dtype=torch.long)
    index[torch.as_tensor(seen, dtype=torch.long)] = torch.arange(len(seen))
    cells = torch.where((ids >= 0) & (ids < V), index[ids.clamp(0, V - 1)], MASK)
    cells = torch.where(ids == UNSET, GAP, cells)
    return Trace(cells, clean.cpu().bool(), [tokenizer.decode([i]) for i in seen])


def given_positions(tokenizer, shape: tuple[int, int], prompt: str | None, template: str | None,
                    seq_len: int) -> torch.Tensor:
    """(B, L) bool: what ``dlm sample`` kept fixed — the prompt's tokens, or the template's text."""
    from dlm.infill import parse_template

    clean = torch.zeros(shape, dtype=torch.bool)
    if template is not None:
        clean[:] = torch.as_tensor(parse_template(template, tokenizer, seq_len).clean, dtype=torch.bool)
    elif prompt:
        clean[:, : len(tokenizer.encode(prompt))] = True
    return clean


def save_trace(path: Path, frames: list[torch.Tensor], tokenizer, prompt: str | None, template: str | None,
               seq_len: int, title: str) -> None:
    """Write the recorded ``frames`` of one ``dlm sample`` call (``prompt`` or ``template``
    kept fixed) to ``path``."""
    clean = given_positions(tokenizer, tuple(frames[0].shape) if frames else (0, 0), prompt, template, seq_len)
    write_trace(path, build_trace(frames, clean, tokenizer), title)


FORMATS: Registry = Registry("trace format")


def check_trace_path(path: Path) -> None:
    """Refuse, before any work, a trace file dlm could not write: an unknown extension, a
    folder, or a place without write permission."""
    path = Path(path)
    if path.is_dir():
        raise DlmError(f"--trace {path} is a folder: give a file name ending in .html or .gif")
    FORMATS.get(path.suffix.lower() or "(none)")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise DlmError(f"cannot write --trace {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise DlmError(f"cannot write --trace {path}: permission denied")
    FORMATS.get(path.suffix.lower()).check()


def write_trace(path: Path, trace: Trace, title: str = "dlm sample") -> None:
    """Write ``trace`` to ``path`` in the format its extension names, atomically."""
    path = Path(path)
    data = FORMATS.get(path.suffix.lower()).render(trace, title)
    tmp = temp_name(path.parent, f".{path.name}.")
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


# ---- HTML -------------------------------------------------------------------------------

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>%(title)s</title>
<style>
body{font:14px/1.5 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
#bar{position:sticky;top:0;background:#fafafa;padding:.5em 0;display:flex;gap:1em;align-items:center}
#step{width:min(60vw,700px)} .row{font:13px/1.9 ui-monospace,monospace;white-space:pre-wrap;
background:#fff;border:1px solid #ddd;border-radius:4px;padding:.6em;margin:.6em 0}
.t{border-radius:2px;padding:0 1px} .g{background:#e4e4e4;color:#555} .m{background:#555;color:#bbb}
.u{border:1px dotted #aaa;color:#aaa} .new{outline:2px solid #000} .legend span{padding:0 .4em}
</style></head><body>
<h3>%(title)s</h3>
<div id="bar"><button id="play">▶ play</button><input id="step" type="range" min="0" value="0">
<span id="label"></span></div>
<div class="legend">colour: the step at which a token last changed (<span id="early">early</span> →
<span id="late">late</span>); <span class="t g">given</span> <span class="t m">▒</span> mask
<span class="t u">·</span> not generated yet; outlined: changed at this step</div>
<div id="rows"></div>
<script id="data" type="application/json">%(data)s</script>
<script>
const D = JSON.parse(document.getElementById("data").textContent);
const F = D.frames.length, slider = document.getElementById("step");
slider.max = F - 1;
const hue = s => 240 - 240 * (F > 1 ? s / (F - 1) : 1);
document.getElementById("early").style.background = `hsl(${hue(0)},80%%,85%%)`;
document.getElementById("late").style.background = `hsl(${hue(F - 1)},80%%,85%%)`;
const show = t => t.replace(/\\n/g, "↵\\n").replace(/\\t/g, "→");
function draw(f) {
  const rows = document.getElementById("rows");
  rows.innerHTML = "";
  D.frames[f].forEach((row, b) => {
    const div = document.createElement("div"); div.className = "row";
    row.forEach((cell, i) => {
      const s = document.createElement("span"), when = D.changed[f][b][i];
      s.className = "t";
      if (cell === -2) { s.className += " u"; s.textContent = "·"; }
      else if (cell === -1) { s.className += " m"; s.textContent = "▒"; }
      else {
        s.textContent = show(D.texts[cell]);
        if (D.clean[b][i]) s.className += " g";
        else s.style.background = `hsl(${hue(when)},80%%,85%%)`;
      }
      if (f > 0 && when === f) s.className += " new";
      div.appendChild(s);
    });
    rows.appendChild(div);
  });
  document.getElementById("label").textContent = `step ${f} of ${F - 1}`;
}
slider.oninput = () => draw(+slider.value);
let timer = null;
document.getElementById("play").onclick = () => {
  if (timer) { clearInterval(timer); timer = null; return; }
  if (+slider.value === F - 1) slider.value = 0;
  timer = setInterval(() => {
    if (+slider.value >= F - 1) { clearInterval(timer); timer = null; return; }
    slider.value = +slider.value + 1; draw(+slider.value);
  }, Math.max(30, 4000 / F));
};
// FILE.html#N opens at step N (default: the last, the sample)
const asked = parseInt(location.hash.slice(1)), first = asked >= 0 && asked < F ? asked : F - 1;
slider.value = first; draw(first);
</script></body></html>
"""


class HtmlFormat:
    @staticmethod
    def check() -> None:
        """Nothing to check: the page needs no package."""

    @staticmethod
    def render(trace: Trace, title: str) -> bytes:
        data = {"texts": trace.texts, "frames": trace.frames.tolist(), "changed": trace.last_changed.tolist(),
                "clean": trace.clean.tolist()}
        # inside <script>, "</" would end the element: escape it in the JSON
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
        return (_PAGE % {"title": html.escape(title), "data": text}).encode("utf-8")


FORMATS.register(".html")(HtmlFormat)


# ---- GIF --------------------------------------------------------------------------------

_WIDTH, _PAD, _LINE = 900, 10, 20


def _colour(step: int, frames: int) -> tuple[int, int, int]:
    """The HTML page's hsl(240 → 0, 80%, 85%) for ``step`` of ``frames``."""
    import colorsys

    h = (240 - 240 * (step / (frames - 1) if frames > 1 else 1)) / 360
    r, g, b = colorsys.hls_to_rgb(h, 0.85, 0.8)
    return int(r * 255), int(g * 255), int(b * 255)


def _cell_text(trace: Trace, cell: int) -> str:
    if cell < 0:
        return "▒" if cell == MASK else "·"
    return trace.texts[cell].replace("\n", "↵").replace("\t", "→")


def _layout(trace: Trace, font) -> tuple[list[list[tuple[int, int, int]]], int]:
    """Per row, per position: (x, y, width) fixed over the frames (each position as wide as its
    widest text), wrapped at the image width; and the image height."""
    F, B, L = trace.frames.shape
    widths = {c: max(6, int(font.getlength(_cell_text(trace, c)))) + 2
              for c in set(trace.frames.unique().tolist())}
    place, y = [], _PAD + _LINE + 6
    for b in range(B):
        x, row = _PAD, []
        for i in range(L):
            w = max(widths[int(c)] for c in trace.frames[:, b, i].unique().tolist())
            if x + w > _WIDTH - _PAD:
                x, y = _PAD, y + _LINE
            row.append((x, y, w))
            x += w
        place.append(row)
        y += _LINE + 12
    return place, y + _PAD


class GifFormat:
    @staticmethod
    def check() -> None:
        try:
            import PIL  # noqa: F401
        except ImportError:
            raise DlmError("--trace FILE.gif needs Pillow: pip install 'dlm[bench]' (or write FILE.html)") from None

    @staticmethod
    def render(trace: Trace, title: str) -> bytes:
        from PIL import Image, ImageDraw, ImageFont

        font = ImageFont.load_default(size=13)
        place, height = _layout(trace, font)
        changed, F = trace.last_changed, len(trace.frames)
        images = []
        for f in range(F):
            im = Image.new("RGB", (_WIDTH, height), (250, 250, 250))
            draw = ImageDraw.Draw(im)
            draw.text((_PAD, _PAD), f"{title}: step {f} of {F - 1}", fill=(30, 30, 30), font=font)
            for b, row in enumerate(place):
                for i, (x, y, w) in enumerate(row):
                    cell = int(trace.frames[f, b, i])
                    if cell == MASK:
                        back, ink = (85, 85, 85), (190, 190, 190)
                    elif cell == GAP:
                        back, ink = (250, 250, 250), (170, 170, 170)
                    elif trace.clean[b, i]:
                        back, ink = (228, 228, 228), (90, 90, 90)
                    else:
                        back, ink = _colour(int(changed[f, b, i]), F), (20, 20, 20)
                    draw.rectangle((x, y, x + w - 1, y + _LINE - 3), fill=back)
                    draw.text((x + 1, y + 1), _cell_text(trace, cell), fill=ink, font=font)
            images.append(im.quantize(colors=128))
        buf = io.BytesIO()
        durations = [max(40, 4000 // F)] * (F - 1) + [2000]  # the last frame (the sample) held
        images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
        return buf.getvalue()


FORMATS.register(".gif")(GifFormat)
