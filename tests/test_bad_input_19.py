"""Issue 19, items 2–4: inputs that gave a traceback, passed as text or named the wrong cause,
each through the real command line: one line ``dlm: error: …``, exit 2, no folder left."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlm.cli import main
from dlm.data import prepare_data
from dlm.data.pairs import read_pairs
from dlm.schema import DataConfig
from helpers import TINY, one_line_error, run

REPO = Path(__file__).resolve().parents[1]
BYTE = [a if a != "char" else "byte" for a in TINY]  # the byte tokenizer: it encodes every string it is given


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-input-19")
    corpus = d / "text.txt"
    corpus.write_text("".join(f"To be, or not to be, that is the question {i}.\n" for i in range(200)))
    assert main(["train", "--family", "mdlm", "--data", str(corpus), "--out", str(d / "run"), "--steps", "2", *BYTE]) == 0
    return d / "run"


def _train_refused(data, tmp_path, capsys, *fragments):
    out = tmp_path / "out"
    code, _, err = run(["train", "--family", "mdlm", "--data", str(data), "--out", str(out), "--steps", "2", *BYTE], capsys)
    one_line_error(code, err, *fragments)
    assert not out.exists()


# ---- item 2: tracebacks ------------------------------------------------------------------

@pytest.mark.parametrize("first", [True, False])
def test_deeply_nested_json_in_a_pairs_file(tmp_path, capsys, first):
    nested = "[" * 200_000 + "]" * 200_000
    good = json.dumps({"prompt": "a", "response": "b"})
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join([nested, good] if first else [good, nested]) + "\n")
    # as the first row it cannot make the file a pairs file, so it is a text corpus's bad line
    _train_refused(f, tmp_path, capsys, "pairs.jsonl:1:" if first else "pairs.jsonl:2: not a JSON object")


@pytest.mark.parametrize("row,fragment", [
    ('{"prompt": "x\\ud800y", "response": "ok"}', "pairs.jsonl:1: the prompt holds an unpaired surrogate \\ud800"),
    ('{"prompt": "x", "response": "o\\udfffk"}', "pairs.jsonl:1: the response holds an unpaired surrogate \\udfff"),
    ('{"messages": [{"role": "user", "content": "\\ud83d"}, {"role": "assistant", "content": "k"}]}',
     "pairs.jsonl:1: the prompt holds an unpaired surrogate"),
])
def test_an_unpaired_surrogate_in_a_pairs_row(tmp_path, capsys, row, fragment):
    f = tmp_path / "pairs.jsonl"
    f.write_text(row + '\n{"prompt": "a", "response": "b"}\n')
    _train_refused(f, tmp_path, capsys, fragment)


def test_an_unpaired_surrogate_in_a_text_corpus(tmp_path, capsys):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "fine"}\n{"text": "x\\udcffy"}\n')  # not read as a byte 0xff: it came from JSON
    _train_refused(f, tmp_path, capsys, "docs.jsonl:2: the text holds an unpaired surrogate \\udcff")


@pytest.mark.parametrize("flag,value,fragment", [
    ("--prompt", b"To \xff be", "--prompt is not UTF-8 text (byte 0xff at character 3)"),
    ("--infill", b"To \xc3 [MASK*2] be", "--infill is not UTF-8 text (byte 0xc3 at character 3)"),
])
def test_bytes_that_are_not_utf8_on_the_command_line(byte_run, flag, value, fragment):
    r = subprocess.run([os.fsencode(sys.executable), b"-m", b"dlm", b"sample", os.fsencode(byte_run),
                        flag.encode(), value, b"--num", b"1", b"--steps", b"2"], capture_output=True)
    err = r.stderr.decode("utf-8", "replace")
    one_line_error(r.returncode, err, fragment)


@pytest.mark.parametrize("digits", ["9" * 5000, "1000000000000", "33"])
def test_a_hole_longer_than_the_model(byte_run, capsys, digits):
    # 5,000 digits pass Python's int-conversion limit; 10^12 placeholders were built and ran out of memory
    shown = digits if len(digits) <= 20 else "99999999… (5,000 digits)"
    one_line_error(*run(["sample", str(byte_run), "--infill", f"To be, [MASK*{digits}] not"], capsys)[::2],
                   f"an infill hole of {shown} tokens is too long: this model takes at most 32")


def test_leading_zeros_in_a_hole_are_its_size(byte_run, capsys):
    code, out, err = run(["sample", str(byte_run), "--infill", "a [MASK*" + "0" * 5000 + "3] b", "--num", "1",
                          "--steps", "2", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["length"] == 1 + 1 + 3 + 1 + 1  # "a ", three tokens, " b": one byte a token


# ---- item 3: malformed holes beside a valid one ------------------------------------------

@pytest.mark.parametrize("bad", ["[MASK*-1]", "[MASK*abc]", "[MASK*3", "[MASK* 3]", "[MASK*2.5]"])
def test_a_malformed_hole_is_refused_even_beside_a_valid_one(byte_run, capsys, bad):
    one_line_error(*run(["sample", str(byte_run), "--infill", f"To [MASK*2] be {bad} x"], capsys)[::2],
                   "malformed hole", repr(f"{bad} x" if bad == "[MASK*3" else bad))


def test_a_template_with_only_a_malformed_hole_says_malformed(byte_run, capsys):
    one_line_error(*run(["sample", str(byte_run), "--infill", "To be [MASK*-1] x"], capsys)[::2], "malformed hole")


# ---- item 4: the right cause -------------------------------------------------------------

def test_a_pairs_file_with_a_byte_order_mark_is_read_as_pairs(tmp_path, capsys):
    f = tmp_path / "pairs.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"prompt": f"Q{i}: ", "response": f"A{i}"}) + "\n"
                                             for i in range(10)).encode())
    assert read_pairs(f)[0].prompt == "Q0: "  # the mark is not part of the first prompt
    assert prepare_data(DataConfig(data=str(f), tokenizer="byte", seq_len=32)).is_pairs
    code, _, err = run(["train", "--family", "mdlm", "--data", str(f), "--out", str(tmp_path / "r"), "--steps", "2",
                        *BYTE], capsys)
    assert code == 0, err


def test_a_text_corpus_with_a_byte_order_mark(tmp_path, capsys):
    from dlm.data.corpora import _file_docs

    f = tmp_path / "docs.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"text": f"line {i} of text"}) + "\n" for i in range(50)).encode())
    assert next(_file_docs(f)) == "line 0 of text"
    code, _, err = run(["train", "--family", "mdlm", "--data", str(f), "--out", str(tmp_path / "r"), "--steps", "2",
                        *BYTE], capsys)
    assert code == 0, err


def _task_yaml(folder: Path, name: str, drop: str | None = None, extra: str = "") -> None:
    """The shipped tiny task under another name, its data in ``folder``, ``drop`` line left out."""
    src = REPO / "tests" / "data" / "lm_eval_task"
    (folder / "data.jsonl").write_bytes((src / "dlm_tiny_mc.jsonl").read_bytes())
    lines = []
    for line in (src / "dlm_tiny_mc.yaml").read_text().splitlines():
        if drop and line.startswith(drop + ":"):
            continue
        line = line.replace("task: dlm_tiny_mc", f"task: {name}")
        lines.append(line.replace("tests/data/lm_eval_task/dlm_tiny_mc.jsonl", str(folder / "data.jsonl")))
    (folder / f"{name}.yaml").write_text("\n".join(lines) + "\n" + extra)


def test_a_malformed_task_yaml_names_its_yaml_error(byte_run, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    _task_yaml(tmp_path, "dlm_bad_yaml", extra="doc_to_choice: [unclosed\n")
    code, out, err = run(["lm-eval", str(byte_run), "--tasks", "dlm_bad_yaml", "--include-path", str(tmp_path)], capsys)
    one_line_error(code, err, "unknown lm-eval task 'dlm_bad_yaml'", f"{tmp_path / 'dlm_bad_yaml.yaml'}",
                   "cannot read (line 28: did not find expected ',' or ']')")


def test_a_task_yaml_without_doc_to_text_names_the_field(byte_run, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    _task_yaml(tmp_path, "dlm_no_text", drop="doc_to_text")
    code, out, err = run(["lm-eval", str(byte_run), "--tasks", "dlm_no_text", "--include-path", str(tmp_path)], capsys)
    one_line_error(code, err, "lm-eval task 'dlm_no_text': its YAML", "has no doc_to_text")
    assert "not available offline" not in err and out == ""  # nor lm-eval's stray print on stdout


def test_a_multiple_choice_task_yaml_without_doc_to_choice_names_the_field(byte_run, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    _task_yaml(tmp_path, "dlm_no_choice", drop="doc_to_choice")
    code, out, err = run(["lm-eval", str(byte_run), "--tasks", "dlm_no_choice", "--include-path", str(tmp_path)], capsys)
    one_line_error(code, err, "lm-eval task 'dlm_no_choice': its YAML", "has no doc_to_choice")  # was a traceback
