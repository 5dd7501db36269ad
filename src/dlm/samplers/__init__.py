"""Samplers: one file per algorithm; each owns its loop, the model only predicts."""

from dlm.registry import Registry
from dlm.samplers.autoregressive import AutoregressiveSampler
from dlm.samplers.base import SamplingOptions, filter_logits, sample_categorical
from dlm.samplers.masked_ancestral import MaskedAncestralSampler

MASKED_SAMPLERS: Registry[type] = Registry("masked-diffusion sampler")
MASKED_SAMPLERS.register("ancestral")(MaskedAncestralSampler)

__all__ = [
    "MASKED_SAMPLERS",
    "AutoregressiveSampler",
    "MaskedAncestralSampler",
    "SamplingOptions",
    "filter_logits",
    "sample_categorical",
]
