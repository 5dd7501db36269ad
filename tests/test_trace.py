"""``dlm sample --trace``: every registered sampler records its whole state at the start and
after every step (the last frame is the sample it returns), and the CLI writes the trajectory
as a self-contained HTML page (opened in a real headless Chromium) or a GIF."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest
import torch

from dlm.samplers.base import UNSET, recording
from helpers import TINY, one_line_error, run
from test_contracts import SAMPLER_ENTRIES, V, build
from test_infill import runs  # noqa: F401  (the tiny mdlm, usdm and ar runs)

STEPS = 6
# samplers whose number of steps is fixed by their settings: frames = 1 + steps (+ what follows the last step)
FIXED_STEPS = {("remdm", "masked"), ("llada", "masked"), ("ancestral", "uniform"), ("ancestral", "d3pm-absorbing"),
               ("ancestral", "d3pm-uniform"), ("ancestral", "hybrid")}


def traced_sample(fam, model, given, clean, settings, seed=4):
    with recording() as frames:
        out, nfe = fam.sample(model, given, clean, torch.Generator().manual_seed(seed), settings)
    return out, nfe, frames


@pytest.mark.parametrize("name,process", SAMPLER_ENTRIES)
def test_the_trace_holds_every_step_and_ends_with_the_sample(name, process):
    fam, model = build(process, sampler=name)
    model.eval()
    settings = dataclasses.replace(fam.sampler_settings, steps=STEPS)
    given = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(2))
    clean = torch.zeros(3, 10, dtype=torch.bool)
    clean[:, :2] = True
    if not fam.causal:
        clean[0, -3:] = True  # the right side of a hole
    out, nfe, frames = traced_sample(fam, model, given, clean, settings)
    assert len(frames) >= 2 and all(f.shape == given.shape for f in frames)
    assert torch.equal(frames[-1], out.cpu()), "the last frame is not the returned sample"
    for f in frames:
        assert torch.equal(f[clean], given[clean]), "a frame changed a clean position"
    first = frames[0][~clean]
    if fam.causal:
        assert bool((first == UNSET).all()) and len(frames) == 1 + int((~clean).sum(-1).max())
    elif process in ("masked", "hybrid", "d3pm-absorbing"):
        assert bool((first >= V).all()), "the first frame is not the prior (all masked)"
    if (name, process) in FIXED_STEPS:
        assert len(frames) == 1 + STEPS, len(frames)
    elif not fam.causal:
        assert len(frames) <= 1 + STEPS + getattr(settings, "correction_steps", 0)
    # tracing changes nothing: the same draw without it
    again, _ = fam.sample(model, given, clean, torch.Generator().manual_seed(4), settings)
    assert torch.equal(again, out)


def test_the_uncached_ancestral_sampler_records_one_frame_per_network_call():
    fam, model = build("masked", sampler="ancestral")
    model.eval()
    settings = dataclasses.replace(fam.sampler_settings, steps=STEPS, cache=False)
    given = torch.zeros(2, 10, dtype=torch.long)
    out, nfe, frames = traced_sample(fam, model, given, torch.zeros_like(given, dtype=torch.bool), settings)
    assert len(frames) == 1 + nfe  # each step of the loop is one full-batch call and one frame
    masks = [int((f >= V).sum()) for f in frames]
    assert masks[0] == given.numel() and masks[-1] == 0 and masks == sorted(masks, reverse=True)


# ---- the CLI -----------------------------------------------------------------------------

def page_data(path):
    text = path.read_text(encoding="utf-8")
    data = re.search(r'<script id="data" type="application/json">(.*?)</script>', text, re.S).group(1)
    return text, json.loads(data)


def decode_frame(data, row):
    return "".join(data["texts"][c] for c in row)


def test_html_trace_of_a_prompted_sample(runs, tmp_path, capsys):
    path = tmp_path / "t.html"
    code, out, err = run(["sample", str(runs["mdlm"]), "--num", "2", "--steps", "8", "--prompt", "To be",
                          "--json", "--trace", str(path), "sampler.cache=false"], capsys)
    assert code == 0, err
    result = json.loads(out)
    text, data = page_data(path)
    assert not re.search(r"(src|href)\s*=|https?://|@import|fetch\(", text.replace("http://www.w3.org", "")), \
        "the page must fetch nothing"
    frames = data["frames"]
    assert len(frames) == 1 + result["nfe"] and len(frames[0]) == 2
    prompt = len(data["clean"][0]) - data["clean"][0][::-1].index(True)  # the prompt's length in tokens
    assert all(c == -1 for c in frames[0][0][prompt:]), "the first frame is all masks after the prompt"
    assert all(c >= 0 for c in frames[-1][0]), "the last frame still holds masks"
    for row, sample in zip(frames[-1], result["samples"]):  # the last frame is the sample printed
        assert sample.startswith("To be") and decode_frame(data, row).startswith(sample.replace("<|endoftext|>", ""))
    assert data["changed"][-1][0][:prompt] == [0] * prompt  # the prompt never changes


def test_gif_trace_of_an_infilled_template(runs, tmp_path, capsys):
    from PIL import Image

    path = tmp_path / "t.gif"
    code, out, err = run(["sample", str(runs["mdlm"]), "--num", "2", "--steps", "5", "--infill",
                          "To be, [MASK*6] to be", "--trace", str(path), "sampler.cache=false", "--json"], capsys)
    assert code == 0, err
    im = Image.open(path)
    assert im.format == "GIF" and im.n_frames == 1 + json.loads(out)["nfe"]


def test_html_trace_of_the_autoregressive_sampler(runs, tmp_path, capsys):
    path = tmp_path / "ar.html"
    code, out, err = run(["sample", str(runs["ar"]), "--num", "1", "--length", "12", "--trace", str(path),
                          "--json"], capsys)
    assert code == 0, err
    _, data = page_data(path)
    frames = data["frames"]
    assert len(frames) == 13 and frames[0][0] == [-2] * 12  # one token per step, none there at the start
    assert decode_frame(data, frames[-1][0]) == json.loads(out)["samples"][0]


@pytest.mark.parametrize("target,fragment", [
    ("t.txt", "unknown trace format '.txt'"),
    ("t", "unknown trace format '(none)'"),
    ("adir", "is a folder"),
    ("afile/t.html", "is a file, not a folder"),
])
def test_a_bad_trace_path_is_one_line_and_writes_nothing(runs, tmp_path, capsys, target, fragment):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, _, err = run(["sample", str(runs["mdlm"]), "--trace", str(tmp_path / target)], capsys)
    one_line_error(code, err, fragment)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission")
def test_an_unwritable_trace_folder_is_one_line(runs, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = run(["sample", str(runs["mdlm"]), "--trace", str(locked / "t.html")], capsys)
    one_line_error(code, err, "permission denied")
    assert not list(locked.iterdir())


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="no sysfs (not Linux)")
def test_a_trace_where_not_even_root_may_write_is_one_line(runs, capsys):
    """sysfs takes no new file from anyone (the test above skips as root)."""
    for target in ("/sys/dlm-trace.html", "/sys/dlm-trace.gif"):
        code, _, err = run(["sample", str(runs["mdlm"]), "--trace", target], capsys)
        one_line_error(code, err, "cannot write", target)
        assert not os.path.exists(target)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install -y chromium)")
def test_the_page_runs_in_a_real_headless_chromium(runs, tmp_path, capsys):
    """Offline, as a user opens it: the script draws every row and the slider's label."""
    path = tmp_path / "t.html"
    code, _, err = run(["sample", str(runs["mdlm"]), "--num", "2", "--steps", "6", "--trace", str(path)], capsys)
    assert code == 0, err
    _, data = page_data(path)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run"]
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([CHROMIUM, *flags, f"--user-data-dir={profile}", "--dump-dom", path.as_uri()],
                             capture_output=True, text=True, timeout=120).stdout
        shot = tmp_path / "shot.png"
        subprocess.run([CHROMIUM, *flags, f"--user-data-dir={profile}", f"--screenshot={shot}",
                        "--window-size=1000,700", path.as_uri()], capture_output=True, timeout=120)
    F = len(data["frames"])
    assert f"step {F - 1} of {F - 1}" in dom, "the page's script did not run"
    assert dom.count('class="row"') == 2 and dom.count('<span class="t') >= 2 * 32
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
