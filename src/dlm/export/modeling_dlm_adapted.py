"""A pretrained causal LM adapted to diffusion by dlm (``dlm train --init-from hf:FOLDER
--family mdlm | usdm``) as a Hugging Face model: the file ``dlm export`` copies next to
config.json, so that ``AutoModel.from_pretrained(FOLDER, trust_remote_code=True)`` loads it
with torch and transformers only (nothing of dlm).

The network is the pretrained architecture itself (``config.base``: its own config.json, built
with ``AutoModelForCausalLM.from_config``) under the attribute ``hf``, with dlm's adaptation
(Dream / DiffuLLaMA; ``dlm.backbones.pretrained``): the input embedding grown to
``vocab_in`` rows (the absorbing [MASK] state is the id ``mask_token_id`` = ``vocab_out``),
full (bidirectional) attention, and shifted logits — the prediction for position i is read
where the AR model predicts token i, at position i − 1 (position 0 reads its own).
``attention_mask`` (1 keep, 0 padding) hides padded keys.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class DlmAdaptedConfig(PretrainedConfig):
    model_type = "dlm_adapted"

    def __init__(self, base=None, vocab_in=1, vocab_out=1, dlm=None, **kwargs):
        self.base = base or {}  # the pretrained architecture's config.json
        self.vocab_in, self.vocab_out = vocab_in, vocab_out
        self.dlm = dlm or {}  # what dlm needs to read the folder back: family, step
        super().__init__(**kwargs)


class DlmAdaptedModel(PreTrainedModel):
    config_class = DlmAdaptedConfig
    base_model_prefix = "dlm"

    def __init__(self, config):
        super().__init__(config)
        base = dict(config.base)
        self.hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(base.pop("model_type"), **base))
        if config.vocab_in != self.hf.get_input_embeddings().num_embeddings:
            self.hf.resize_token_embeddings(config.vocab_in, mean_resizing=False)
        self.post_init()

    def _init_weights(self, module):
        pass  # the pretrained architecture initialises its own modules; the export's weights follow

    def forward(self, input_ids, attention_mask=None, **kwargs):
        """float32 logits (B, T, vocab_out) of ``input_ids`` (B, T), [MASK] included."""
        B, T = input_ids.shape
        eye = torch.eye(T, dtype=torch.bool, device=input_ids.device)
        if attention_mask is None:
            mask = torch.ones(B, 1, T, T, dtype=torch.bool, device=input_ids.device)
        else:
            mask = attention_mask.bool()[:, None, None, :] | eye  # every kept key, and each query itself
        embeds = self.hf.get_input_embeddings()(input_ids)
        logits = self.hf(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
        logits = logits[..., : self.config.vocab_out]
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # Dream's shift
        return CausalLMOutput(logits=logits.float())
