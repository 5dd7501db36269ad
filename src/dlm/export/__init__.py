"""``dlm export RUN OUT``: a run as a Hugging Face model folder.

OUT holds what ``transformers.AutoModel.from_pretrained(OUT, trust_remote_code=True)`` needs
— ``config.json`` (``model_type: dlm``, an ``auto_map`` naming ``modeling_dlm.py``),
``model.safetensors`` (the run's weights, EMA when it has them, as ``dlm eval`` uses them)
and ``modeling_dlm.py`` (a copy of :mod:`dlm.export.modeling_dlm`: dlm's forward with torch
and transformers only) — the tokenizer in Hugging Face's format where it has one
(``tokenizer.json`` for the ``bpe`` and ``gpt2`` tokenizers), and what dlm needs to read the
folder back as a run (``dlm_config.yaml``, ``dlm_tokenizer.json``: ``dlm eval OUT`` and
``dlm sample OUT`` work on it as on RUN). The folder is written under a temporary name and
renamed, so OUT is whole or absent.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from dlm.config import save_yaml
from dlm.errors import DlmError
from dlm.fsio import make_temp_dir, writing
from dlm.export.pretrained import pretrained_parts
from dlm.runs import EXPORT_CONFIG, EXPORT_TOKENIZER, load_run

MODELING = Path(__file__).with_name("modeling_dlm.py")


def check_export_target(out: Path) -> None:
    """OUT must be new (or an empty folder) and its parent a folder dlm may write in."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DlmError(f"{out} exists and is not an empty folder: export into a new folder")
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise DlmError(f"cannot create {out}: {parent} is not a folder dlm may write in")


def hf_config(run, state: dict) -> dict:
    """config.json: the transformer's shape, the auto classes, and dlm's own record."""
    m, cfg = run.model.cfg, run.cfg
    auto = {"AutoConfig": "modeling_dlm.DlmConfig", "AutoModel": "modeling_dlm.DlmModel"}
    if m.causal:
        auto["AutoModelForCausalLM"] = "modeling_dlm.DlmModel"
    out = {"model_type": "dlm", "architectures": ["DlmModel"], "auto_map": auto,
           "vocab_in": m.vocab_in, "vocab_out": m.vocab_out, "vocab_size": m.vocab_in, "n_layer": m.n_layer,
           "n_head": m.n_head, "d_model": m.d_model, "causal": m.causal, "cond_dim": m.cond_dim,
           "mlp_ratio": m.mlp_ratio, "rope_base": m.rope_base, "eos_token_id": run.tokenizer.eos_id,
           "torch_dtype": "float32",
           "dlm": {"family": cfg.family, "step": run.step, "tokenizer": run.tokenizer.kind,
                   "time_conditioned": run.family.time_conditioned, "source": str(run.path)}}
    if m.vocab_in > m.vocab_out:  # the absorbing state: [MASK] is the id after the data vocabulary
        out["mask_token_id"] = m.vocab_out
    if getattr(run.model, "in_proj", None) is not None:  # vectors in (gaussian): their width, self-conditioning
        out["input_width"], out["self_condition"] = run.model.in_proj.in_features, run.model.sc_proj is not None
    return out


def _hf_tokenizer(tokenizer) -> dict[str, str]:
    """The tokenizer files transformers reads (``PreTrainedTokenizerFast``), where the run's
    tokenizer is a Hugging Face ``tokenizers`` one; {} for char and byte tokenizers."""
    tok = getattr(tokenizer, "tok", None)
    if tok is None:
        return {}
    eos = tokenizer.decode([tokenizer.eos_id])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos, "unk_token": eos,
              "model_max_length": 1_000_000}
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=1)}


def _card(run, config: dict) -> str:
    family, kind = config["dlm"]["family"], config["dlm"]["tokenizer"]
    return f"""---
library_name: transformers
tags: [dlm, diffusion-language-model, {family}]
---
# {run.path.name} (dlm {family} model)

Exported by `dlm export` from the run at step {run.step} ({kind} tokenizer).

```python
from transformers import AutoModel
model = AutoModel.from_pretrained("PATH_OR_REPO", trust_remote_code=True)
logits = model({"inputs_embeds=z_t" if config.get("input_width") else "input_ids"}{", t=t" if config["cond_dim"] else ""}).logits
```
{"z_t (B, T, C) is the noisy embedding state; `model.process(ids)` gives the clean embeddings." if config.get("input_width") else ""}

With dlm: `dlm sample PATH --num 4`, `dlm eval PATH`.
"""


def export_run(run_path: Path, out: Path, use_ema: bool = True) -> dict:
    """Write run ``run_path`` as a Hugging Face folder ``out``; returns what was written."""
    out = Path(out)
    check_export_target(out)
    run = load_run(Path(run_path), "cpu", use_ema=use_ema)
    state = {k: v.detach().contiguous() for k, v in run.model.state_dict().items()}
    if run.cfg.model.pretrained:
        files, write_model = pretrained_parts(run, state)
    else:
        files, write_model = _dlm_parts(run, run_path, state)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.")
    try:
        with writing(out):
            write_model(tmp)
            for name, text in files.items():
                (tmp / name).write_text(text, encoding="utf-8")
            run.tokenizer.save(tmp / EXPORT_TOKENIZER)
            if out.exists():
                out.rmdir()  # empty (checked above)
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "family": run.cfg.family, "step": run.step, "files": sorted(p.name for p in out.iterdir()),
            "params": sum(v.numel() for v in state.values())}


_MODULES = {"embed", "time", "blocks", "norm", "final_ada", "head",
            "in_proj", "sc_proj", "process"}  # the vector-input transformer's (gaussian): modeling_dlm has them


def _dlm_parts(run, run_path: Path, state: dict):
    """The text files of a run of dlm's own transformer, and what writes its code and weights."""
    if run.family.backbone != "transformer" or any(not k.split(".")[0] in _MODULES for k in state):
        raise DlmError(f"{run_path} is a '{run.cfg.family}' run whose model is not dlm's plain transformer "
                       f"(its keys: {sorted({k.split('.')[0] for k in state} - _MODULES)}): it cannot be exported yet")
    config = hf_config(run, state)
    files = {"config.json": json.dumps(config, indent=1), EXPORT_CONFIG: save_yaml(run.cfg),
             "README.md": _card(run, config), **_hf_tokenizer(run.tokenizer)}

    def write_model(tmp: Path) -> None:
        shutil.copyfile(MODELING, tmp / "modeling_dlm.py")
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})

    return files, write_model
