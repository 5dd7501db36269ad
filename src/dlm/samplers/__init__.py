"""Samplers: one file per algorithm; each owns its loop, the model only predicts."""

from dlm.registry import Registry
from dlm.samplers.autoregressive import AutoregressiveSampler
from dlm.samplers.base import SamplingOptions, filter_logits, sample_categorical
from dlm.samplers.masked_ancestral import MaskedAncestralSampler
from dlm.samplers.uniform_ancestral import UniformAncestralSampler

MASKED_SAMPLERS: Registry[type] = Registry("masked-diffusion sampler")
MASKED_SAMPLERS.register("ancestral")(MaskedAncestralSampler)

UNIFORM_SAMPLERS: Registry[type] = Registry("uniform-state diffusion sampler")
UNIFORM_SAMPLERS.register("ancestral")(UniformAncestralSampler)

__all__ = [
    "MASKED_SAMPLERS",
    "UNIFORM_SAMPLERS",
    "UniformAncestralSampler",
    "AutoregressiveSampler",
    "MaskedAncestralSampler",
    "SamplingOptions",
    "filter_logits",
    "sample_categorical",
]
