"""Samplers: one file per algorithm; each owns its loop and its settings, the model only predicts."""

from dlm.registry import Registry
from dlm.samplers.autoregressive import AutoregressiveSampler
from dlm.samplers.base import (DiffusionSamplerSettings, Sampler, SamplerSettings, SamplingOptions, filter_logits,
                               sample_categorical)
from dlm.samplers.d3pm_ancestral import D3PMAncestralSampler
from dlm.samplers.fast_dllm import FastDllmSampler
from dlm.samplers.llada import LLaDASampler
from dlm.samplers.masked_ancestral import MaskedAncestralSampler
from dlm.samplers.remdm import ReMDMSampler
from dlm.samplers.uniform_ancestral import UniformAncestralSampler

MASKED_SAMPLERS: Registry[type[Sampler]] = Registry("masked-diffusion sampler")
MASKED_SAMPLERS.register("ancestral")(MaskedAncestralSampler)
MASKED_SAMPLERS.register("remdm")(ReMDMSampler)
MASKED_SAMPLERS.register("llada")(LLaDASampler)
MASKED_SAMPLERS.register("fast-dllm")(FastDllmSampler)

UNIFORM_SAMPLERS: Registry[type[Sampler]] = Registry("uniform-state diffusion sampler")
UNIFORM_SAMPLERS.register("ancestral")(UniformAncestralSampler)

D3PM_SAMPLERS: Registry[type[Sampler]] = Registry("d3pm sampler")
D3PM_SAMPLERS.register("ancestral")(D3PMAncestralSampler)

AR_SAMPLERS: Registry[type[Sampler]] = Registry("autoregressive sampler")
AR_SAMPLERS.register("ancestral")(AutoregressiveSampler)

__all__ = [
    "MASKED_SAMPLERS",
    "UNIFORM_SAMPLERS",
    "AR_SAMPLERS",
    "D3PM_SAMPLERS",
    "Sampler",
    "SamplerSettings",
    "DiffusionSamplerSettings",
    "SamplingOptions",
    "UniformAncestralSampler",
    "AutoregressiveSampler",
    "MaskedAncestralSampler",
    "ReMDMSampler",
    "LLaDASampler",
    "filter_logits",
    "sample_categorical",
]
