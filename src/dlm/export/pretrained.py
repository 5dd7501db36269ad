"""``dlm export`` of a run whose backbone is a pretrained Hugging Face causal LM
(``dlm train --init-from hf:FOLDER``): "a model adapted from a pretrained one exports the same way".

* **As it is** (``ar``): OUT is a plain folder of the model's own architecture
  (``save_pretrained``: config.json, model.safetensors, generation_config.json) and tokenizer —
  ``AutoModelForCausalLM.from_pretrained(OUT)`` loads it without remote code, and
  ``dlm train --init-from hf:OUT`` starts from it like from any model folder.
* **Adapted** (``mdlm`` / ``usdm``): config.json names ``modeling_dlm_adapted.py`` (a copy of
  :mod:`dlm.export.modeling_dlm_adapted`: the architecture, bidirectional, with the [MASK] row
  and the shifted logits) and holds the architecture's own config as ``base``;
  ``AutoModel.from_pretrained(OUT, trust_remote_code=True)`` gives dlm's logits.
  ``OUT/pretrained`` keeps the architecture for dlm's reading back (as in a run folder).

Either way OUT also holds ``dlm_config.yaml`` and ``dlm_tokenizer.json`` (``dlm eval OUT``,
``dlm sample OUT``) and config.json's ``dlm`` record (family, step).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from dlm.backbones.pretrained import pretrained_folder, save_architecture
from dlm.config import save_yaml
from dlm.runs import EXPORT_CONFIG

MODELING = Path(__file__).with_name("modeling_dlm_adapted.py")


def _record(run) -> dict:
    return {"family": run.cfg.family, "step": run.step, "tokenizer": run.tokenizer.kind, "time_conditioned": False,
            "source": str(run.path), "pretrained": run.cfg.model.pretrained}


def _card(run, adapted: bool) -> str:
    load = ('from transformers import AutoModel\nmodel = AutoModel.from_pretrained("PATH_OR_REPO", '
            'trust_remote_code=True)' if adapted else
            'from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")')
    return f"""---
library_name: transformers
tags: [dlm, {run.cfg.family}]
---
# {run.path.name} (dlm {run.cfg.family} model, from {run.cfg.model.pretrained})

Exported by `dlm export` from the run at step {run.step}.

```python
{load}
logits = model(input_ids).logits
```

With dlm: `dlm sample PATH --num 4`, `dlm eval PATH`{"" if adapted else ", `dlm train --init-from hf:PATH`"}.
"""


def pretrained_parts(run, state: dict):
    """The text files of the export of ``run`` (a pretrained backbone's), and what writes its
    model: the architecture as it is (causal) or dlm's adapted model (bidirectional)."""
    arch = pretrained_folder(run.family.cfg.model.pretrained)  # the run's copy of the architecture, or FOLDER
    adapted = not run.model.causal
    files = {EXPORT_CONFIG: save_yaml(run.cfg), "README.md": _card(run, adapted)}

    def write_model(tmp: Path) -> None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(arch, local_files_only=True).save_pretrained(tmp)  # the tokenizer files
        if adapted:
            _write_adapted(run, state, arch, tmp)
        else:
            run.model.hf.save_pretrained(tmp, safe_serialization=True)
            config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
            (tmp / "config.json").write_text(json.dumps({**config, "dlm": _record(run)}, indent=1), encoding="utf-8")

    return files, write_model


def _write_adapted(run, state: dict, arch: Path, tmp: Path) -> None:
    m = run.model
    config = {"model_type": "dlm_adapted", "architectures": ["DlmAdaptedModel"],
              "auto_map": {"AutoConfig": "modeling_dlm_adapted.DlmAdaptedConfig",
                           "AutoModel": "modeling_dlm_adapted.DlmAdaptedModel"},
              "base": json.loads((arch / "config.json").read_text(encoding="utf-8")),
              "vocab_in": m.vocab_in, "vocab_out": m.vocab_out, "eos_token_id": run.tokenizer.eos_id,
              "torch_dtype": "float32", "dlm": _record(run)}
    if m.vocab_in > m.vocab_out:  # the absorbing state: [MASK] is the id after the data vocabulary
        config["mask_token_id"] = m.vocab_out
    (tmp / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    shutil.copyfile(MODELING, tmp / MODELING.name)
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    save_architecture(run.family.cfg.model.pretrained, tmp)  # OUT/pretrained: dlm reads the export back
