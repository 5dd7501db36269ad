"""``dlm export RUN OUT``: transformers loads the folder (trust_remote_code, offline) with the
logits of dlm's own model, and dlm reads it back as the run it came from."""

from __future__ import annotations

import ast
import json

import pytest
import torch

from dlm.cli import main
from dlm.runs import load_run
from helpers import TINY, one_line_error, run
from test_infill import runs  # noqa: F401  (the tiny mdlm, usdm and ar runs, char tokenizer)

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    out = {}
    for family, path in runs.items():
        out[family] = d / family
        assert main(["export", str(path), str(out[family])]) == 0
    return out


def hf_logits(folder, x, **kw):
    model = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        return model(x, **kw).logits


@pytest.mark.parametrize("family", ["mdlm", "usdm", "ar"])
def test_transformers_gives_dlm_s_logits(runs, exported, family):
    dlm_run = load_run(runs[family], "cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, dlm_run.model.vocab_in, (3, 24), generator=g)
    pad = torch.zeros(3, 24, dtype=torch.bool)
    pad[1, -5:] = True
    t = torch.rand(3, generator=g) if dlm_run.family.time_conditioned else None
    with torch.no_grad():
        ours, ours_pad = dlm_run.model(x, t), dlm_run.model(x, t, pad=pad)
    kw = {} if t is None else {"t": t}
    assert torch.equal(hf_logits(exported[family], x, **kw), ours)
    assert torch.equal(hf_logits(exported[family], x, attention_mask=(~pad).long(), **kw), ours_pad)
    config = json.loads((exported[family] / "config.json").read_text())
    assert config["dlm"]["family"] == family and config["causal"] == (family == "ar")
    if family == "mdlm":
        assert config["mask_token_id"] == dlm_run.tokenizer.vocab_size  # [MASK] after the data vocabulary


@pytest.mark.parametrize("family", ["mdlm", "ar"])
def test_dlm_reads_the_export_back(runs, exported, family, capsys):
    def sample(path):
        code, out, err = run(["sample", str(path), "--num", "2", "--steps", "6", "--seed", "3", "--json"], capsys)
        assert code == 0, err
        return json.loads(out)["samples"]

    def nll(path):
        code, out, err = run(["eval", str(path), "--max-tokens", "256", "--mc-samples", "2", "--json"], capsys)
        assert code == 0, err
        return json.loads(out)["nll"]

    assert sample(exported[family]) == sample(runs[family])
    assert nll(exported[family]) == nll(runs[family])


def test_a_bpe_run_exports_its_tokenizer_for_transformers(tmp_path, capsys):
    corpus = tmp_path / "text.txt"
    corpus.write_text("".join(f"To be, or not to be, that is the question {i}.\n" for i in range(300)))
    src, out = tmp_path / "bpe", tmp_path / "bpe-hf"
    tiny = [a for a in TINY if a not in ("--tokenizer", "char")]
    assert main(["train", "--family", "ar", "--data", str(corpus), "--out", str(src), "--steps", "2",
                 "--tokenizer", "bpe", "--vocab-size", "300", *tiny]) == 0
    assert main(["export", str(src), str(out)]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_run(src, "cpu").tokenizer
    text = "To be, or not to be: the question 17."
    assert hf_tok(text)["input_ids"] == ours.encode(text).tolist()
    assert hf_tok.eos_token_id == ours.eos_id


def test_the_modeling_file_needs_nothing_of_dlm(exported):
    tree = ast.parse((exported["mdlm"] / "modeling_dlm.py").read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots <= {"__future__", "math", "torch", "transformers"}, roots


def test_export_into_a_non_empty_folder_is_one_line_and_touches_nothing(runs, tmp_path, capsys):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(["export", str(runs["mdlm"]), str(out)], capsys)
    one_line_error(code, err, "not an empty folder")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(["export", str(runs["mdlm"]), str(empty)], capsys)[0] == 0  # an empty folder is fine
    assert (empty / "model.safetensors").is_file()


def test_export_of_what_is_not_a_run_is_one_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "notarun").mkdir()
    code, _, err = run(["export", str(tmp_path / "notarun"), str(tmp_path / "out")], capsys)
    one_line_error(code, err, "not a dlm run folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notarun"]


def test_a_gaussian_run_exports_exactly(tmp_path, capsys):
    """A self-conditioned Gaussian embedding diffusion run: transformers' logits on the same noisy
    embedding state z_t (and self-conditioning estimate, and padding) are dlm's, its
    ``process(ids)`` is the process's clean embedding, and dlm reads the folder back (same bound)."""
    corpus = tmp_path / "text.txt"
    corpus.write_text("".join(f"To be, or not to be, that is the question {i}.\n" for i in range(200)))
    src, out = tmp_path / "g", tmp_path / "g-hf"
    assert main(["train", "--family", "gaussian", "--data", str(corpus), "--out", str(src), "--steps", "3", *TINY,
                 "process.embed_dim=8", "process.self_condition=0.5"]) == 0
    assert main(["export", str(src), str(out)]) == 0
    capsys.readouterr()
    dlm_run = load_run(src, "cpu")
    process, g = dlm_run.family.process, torch.Generator().manual_seed(0)
    x0 = torch.randint(0, dlm_run.tokenizer.vocab_size, (3, 20), generator=g)
    t = torch.rand(3, generator=g)
    pad = torch.zeros(3, 20, dtype=torch.bool)
    pad[2, -4:] = True
    with torch.no_grad():
        # an estimate projection far from its zero start (3 steps leave it near zero)
        torch.nn.init.normal_(dlm_run.model.sc_proj.weight, std=0.5, generator=g)
        z = process.corrupt(x0, t, g)
        est = torch.randn(z.shape, generator=g)
        ours = dlm_run.model(None, t, embeds=z, self_cond=est, pad=pad)
        plain = dlm_run.model(z, t)
    hf = transformers.AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        hf.sc_proj.weight.copy_(dlm_run.model.sc_proj.weight)
        assert torch.equal(hf(inputs_embeds=z, t=t, self_cond=est, attention_mask=(~pad).long()).logits, ours)
        assert torch.equal(hf(z, t=t).logits, plain)
        assert torch.equal(hf.process(x0), process.embed(x0))
    config = json.loads((out / "config.json").read_text())
    assert config["input_width"] == 8 and config["self_condition"] is True and config["dlm"]["family"] == "gaussian"

    def nll(path):
        code, text, err = run(["eval", str(path), "--max-tokens", "128", "--mc-samples", "1", "--json"], capsys)
        assert code == 0, err
        return json.loads(text)["nll"]

    assert nll(out) == nll(src)
