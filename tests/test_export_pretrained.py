"""``dlm export`` of runs whose backbone is a pretrained causal LM (``--init-from hf:FOLDER``):
the ar model as its own architecture's folder (no remote code), the adapted mdlm / usdm model
with ``modeling_dlm_adapted.py``; transformers' logits equal dlm's, and dlm reads the folder
back. Tiny random Llama and GPT-2 models (tests/test_pretrained.py), no network."""

from __future__ import annotations

import ast
import json

import pytest
import torch

from dlm.cli import main
from dlm.runs import load_run
from helpers import one_line_error, run
from test_pretrained import V, corpus_file, folders  # noqa: F401  (the tiny Llama and GPT-2 folders)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # four tiny runs over the 50,257-token GPT-2 vocabulary, trained and exported
KINDS = [("ar", "llama"), ("ar", "gpt2"), ("mdlm", "llama"), ("usdm", "gpt2")]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def trained(folders, tmp_path_factory):  # noqa: F811
    """{(family, arch): (run, export)}: one step from the pretrained model, then exported."""
    d = tmp_path_factory.mktemp("export-pretrained")
    corpus, out = corpus_file(d), {}
    for family, arch in KINDS:
        src, dst = d / f"{family}-{arch}", d / f"{family}-{arch}-hf"
        assert main(["train", "--init-from", f"hf:{folders[arch]}", "--family", family, "--steps", "1", "--data",
                     str(corpus), "--seq-len", "16", "--batch-size", "2", "--quiet", "--out", str(src)]) == 0
        assert main(["export", str(src), str(dst)]) == 0
        out[family, arch] = src, dst
    return out


def inputs(with_mask: bool):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (3, 12), generator=g)
    if with_mask:
        x[:, 4:8] = V  # [MASK]
    pad = torch.zeros(3, 12, dtype=torch.bool)
    pad[1, -4:] = True
    return x, pad


@pytest.mark.parametrize("family,arch", KINDS)
def test_transformers_gives_dlm_s_logits(trained, family, arch):
    src, out = trained[family, arch]
    ours = load_run(src, "cpu")
    x, pad = inputs(family == "mdlm")
    config = json.loads((out / "config.json").read_text())
    assert config["dlm"]["family"] == family and config["dlm"]["step"] == 1
    if family == "ar":  # the architecture's own folder: no remote code
        assert config["model_type"] == arch and not (out / "modeling_dlm_adapted.py").exists()
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    else:
        assert config["model_type"] == "dlm_adapted" and config.get("mask_token_id") == (V if family == "mdlm" else None)
        theirs = transformers.AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours.model(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(theirs(x, attention_mask=(~pad).long()).logits[~pad],
                                   ours.model(x, pad=pad)[~pad], rtol=0, atol=1e-6)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "To be, or not to be: the question 17."
    assert tok(text, add_special_tokens=False)["input_ids"] == ours.tokenizer.encode(text).tolist()


@pytest.mark.parametrize("family,arch", [("ar", "gpt2"), ("mdlm", "llama")])
def test_dlm_reads_the_export_back(trained, family, arch, capsys):
    src, out = trained[family, arch]

    def sample(path):
        code, text, err = run(["sample", str(path), "--num", "2", "--steps", "4", "--length", "8", "--seed", "3",
                               "--json"], capsys)
        assert code == 0, err
        return json.loads(text)["samples"]

    def nll(path):
        code, text, err = run(["eval", str(path), "--max-tokens", "64", "--mc-samples", "1", "--json"], capsys)
        assert code == 0, err
        return json.loads(text)["nll"]

    assert sample(out) == sample(src)
    assert nll(out) == pytest.approx(nll(src), rel=1e-6)


def test_init_from_an_ar_export_starts_from_its_weights(trained, tmp_path, capsys):
    src, out = trained["ar", "llama"]
    again = tmp_path / "again"
    code, _, err = run(["train", "--init-from", f"hf:{out}", "--family", "ar", "--steps", "0", "--data",
                        str(corpus_file(tmp_path)), "--seq-len", "16", "--quiet", "--out", str(again)], capsys)
    assert code == 0, err
    a, b = load_run(src, "cpu").model.state_dict(), load_run(again, "cpu").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_adapted_modeling_file_needs_nothing_of_dlm(trained):
    tree = ast.parse((trained["mdlm", "llama"][1] / "modeling_dlm_adapted.py").read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots <= {"__future__", "torch", "transformers"}, roots


def test_export_of_a_pretrained_run_into_a_non_empty_folder_is_one_line(trained, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    code, _, err = run(["export", str(trained["mdlm", "llama"][0]), str(full)], capsys)
    one_line_error(code, err, "not an empty folder")
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
