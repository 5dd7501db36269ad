"""Backbones: the network only predicts; processes and samplers own the maths.

``base.py`` holds the contract (:class:`Backbone`: ids or vectors in, logits out) and the
:data:`BACKBONES` registry; ``transformer.py`` the one registered today ("transformer");
``sizes.py`` its named size presets. A family builds its network with :func:`build_backbone`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dlm.backbones.base import BACKBONES, Backbone
from dlm.backbones.pretrained import PretrainedCausalLM
from dlm.backbones.sizes import SIZES, resolve_size
from dlm.backbones.transformer import KVCache, Transformer, TransformerConfig

if TYPE_CHECKING:
    from dlm.backbones.sizes import ModelConfig


def build_backbone(name: str, model_cfg: ModelConfig, *, vocab_in: int, vocab_out: int, causal: bool,
                   cond_dim: int) -> Backbone:
    """The backbone registered as ``name``, shaped by the run config's ``model`` section (its
    size preset resolved, explicit fields overriding it): ``vocab_in`` input ids, ``vocab_out``
    predicted tokens, ``causal`` attention, and adaLN time conditioning of width ``cond_dim``
    (0: none). An unknown name or size raises :class:`~dlm.errors.DlmError`."""
    return BACKBONES.get(name).build(model_cfg, vocab_in=vocab_in, vocab_out=vocab_out, causal=causal,
                                     cond_dim=cond_dim)


__all__ = ["BACKBONES", "SIZES", "Backbone", "KVCache", "PretrainedCausalLM", "Transformer", "TransformerConfig", "build_backbone",
           "resolve_size"]
