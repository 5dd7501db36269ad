"""``dlm train --init-from hf:FOLDER`` and ``--init-from smollm2-135m``: the config of a run that
starts from a pretrained Hugging Face causal LM (``dlm.backbones.pretrained``) — the model as
its backbone, its tokenizer as the run's, no time conditioning."""

from __future__ import annotations

from typing import Any

from dlm.backbones.pretrained import PREFIX, check_causal_lm, check_fits, has_weights, pretrained_folder
from dlm.errors import DlmError
from dlm.schema import RunConfig


def is_pretrained(spec: str) -> bool:
    """Whether ``--init-from`` names a pretrained model (hf:FOLDER, or a shipped one such as
    smollm2-135m) rather than a dlm run folder."""
    from dlm.judge import JUDGES

    return spec.startswith(PREFIX) or spec in JUDGES


def pretrained_folder_of(spec: str) -> str:
    """``hf:FOLDER`` for ``spec``: itself, or the folder a shipped GGUF model is dequantised into
    (the judge's copy: ``dlm.judge``; one line when its package is missing)."""
    from dlm.judge import JUDGES

    if spec.startswith(PREFIX):
        return spec
    return PREFIX + str(JUDGES[spec].folder(spec))


def pretrained_config(spec: str, config: str | None = None, overrides: list[str] | tuple = (),
                      flags: dict[str, Any] | None = None) -> RunConfig:
    """A fresh run config (``--config``, ``key=value`` and ``flags`` as for any run) whose
    backbone is the pretrained model ``spec`` and whose tokenizer is the model's."""
    from dlm.config import build_config

    flags = dict(flags or {})
    tokenizer = flags.get("data.tokenizer")
    if tokenizer not in (None, "pretrained"):
        raise DlmError(f"--init-from {spec} brings its own tokenizer: drop --tokenizer {tokenizer}")
    hf = pretrained_folder_of(spec)
    folder = pretrained_folder(hf)  # one line if it is not a model folder
    check_causal_lm(folder)  # … or not one AutoModelForCausalLM builds
    if not has_weights(folder):
        raise DlmError(f"{folder} holds a model's architecture but no weights (*.safetensors, *.bin): "
                       f"--init-from needs a trained model")
    flags.update({"model.pretrained": hf, "data.tokenizer": "pretrained"})
    cfg = build_config(config, list(overrides), flags)
    from dlm.device import resolve_device

    # weights, gradients, AdamW's two moments (and the EMA) on the training device
    check_fits(folder, resolve_device(cfg.train.device), 4 + (cfg.train.ema_decay > 0), "train")
    if cfg.time_conditioning:
        raise DlmError(f"--init-from {spec}: a pretrained causal LM has no time conditioning: drop time_conditioning=true")
    cfg.time_conditioning = False  # usdm's default is on; the pretrained model has none
    from dlm.data.tokenizers import PretrainedTokenizer

    PretrainedTokenizer.from_folder(folder)  # a tokenizer without an end-of-text token: one line, before any work
    return cfg
