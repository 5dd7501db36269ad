"""Infilling through the CLI: every [MASK*N] hole filled with both sides fixed, the text
outside the holes returned byte for byte; the AR family and bad templates refused in one line."""

import json

import pytest

from dlm.cli import main
from helpers import TINY, one_line_error, run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("infill")
    corpus = d / "text.txt"
    corpus.write_text("".join(f"To be, or not to be, that is the question {i}.\n" for i in range(300)))
    out = {}
    for family in ("mdlm", "usdm", "ar"):
        out[family] = d / family
        assert main(["train", "--family", family, "--data", str(corpus), "--out", str(out[family]),
                     "--steps", "5", *TINY]) == 0
    return out


@pytest.mark.parametrize("family", ["mdlm", "usdm"])
def test_holes_are_filled_and_the_rest_comes_back_byte_for_byte(runs, family, capsys):
    # "Ω" and the emoji are not in the char vocabulary: they encode to <unk>, yet come back intact
    left, mid, right = "To be, ", " not\n Ω🦓 th", "q."
    template = f"{left}[MASK*4]{mid}[MASK*2]{right}"
    code, out, err = run(["sample", str(runs[family]), "--infill", template, "--num", "3", "--steps", "6", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert len(r["samples"]) == 3 and r["length"] == len(left) + 4 + len(mid) + 2 + len(right)  # char: 1 token a character
    for text in r["samples"]:
        assert text.startswith(left) and text.endswith(right) and mid in text
        assert text.index(mid) > len(left)  # the first hole was filled with something


def test_the_autoregressive_family_refuses_holes_with_a_reason(runs, capsys):
    one_line_error(*run(["sample", str(runs["ar"]), "--infill", "To be, [MASK*3] not to be"], capsys)[::2],
                   "left context only")


@pytest.mark.parametrize("template,fragment", [
    ("To be, or not to be", "has no hole"),
    ("To be, [MASK*0] not", "at least 1 token"),
    ("To be, [MASK*40] not", "this model takes at most 32"),
])
def test_bad_templates(runs, capsys, template, fragment):
    one_line_error(*run(["sample", str(runs["mdlm"]), "--infill", template], capsys)[::2], fragment)


def test_infill_and_prompt_together_are_refused(runs, capsys):
    one_line_error(*run(["sample", str(runs["mdlm"]), "--infill", "a [MASK*2] b", "--prompt", "To"], capsys)[::2],
                   "drop --prompt")
