"""Transformer backbones: the network only predicts; processes and samplers own the maths."""

from dlm.backbones.sizes import SIZES, resolve_size
from dlm.backbones.transformer import KVCache, Transformer, TransformerConfig

__all__ = ["SIZES", "KVCache", "Transformer", "TransformerConfig", "resolve_size"]
