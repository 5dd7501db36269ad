"""Samplers: one file per algorithm, each owning its loop and its settings (the model only
predicts), in one registry: each registered under its name for the processes it serves."""

from dlm.registry import ComponentRegistry
from dlm.samplers.autoregressive import AutoregressiveSampler
from dlm.samplers.base import (DiffusionSamplerSettings, Sampler, SamplerSettings, SamplingOptions, filter_logits,
                               sample_categorical)
from dlm.samplers.d3pm_ancestral import D3PMAncestralSampler
from dlm.samplers.fast_dllm import FastDllmSampler
from dlm.samplers.gaussian_ancestral import GaussianAncestralSampler
from dlm.samplers.hybrid_ancestral import HybridAncestralSampler, SelfCorrectSampler
from dlm.samplers.llada import LLaDASampler
from dlm.samplers.masked_ancestral import MaskedAncestralSampler
from dlm.samplers.remdm import ReMDMSampler
from dlm.samplers.uniform_ancestral import UniformAncestralSampler

SAMPLERS: ComponentRegistry[type[Sampler]] = ComponentRegistry("sampler")
SAMPLERS.register("ancestral", processes=("masked",))(MaskedAncestralSampler)
SAMPLERS.register("remdm", processes=("masked",))(ReMDMSampler)
SAMPLERS.register("llada", processes=("masked",))(LLaDASampler)
SAMPLERS.register("fast-dllm", processes=("masked",))(FastDllmSampler)
SAMPLERS.register("ancestral", processes=("uniform",))(UniformAncestralSampler)
SAMPLERS.register("ancestral", processes=("d3pm-absorbing", "d3pm-uniform"))(D3PMAncestralSampler)
SAMPLERS.register("ancestral", processes=("causal",))(AutoregressiveSampler)
SAMPLERS.register("ancestral", processes=("hybrid",))(HybridAncestralSampler)
SAMPLERS.register("self-correct", processes=("hybrid",))(SelfCorrectSampler)
SAMPLERS.register("ancestral", processes=("gaussian",))(GaussianAncestralSampler)

# the per-family views of earlier versions (a family reads its own through ``Family.samplers``)
MASKED_SAMPLERS = SAMPLERS.for_process("masked", "masked-diffusion sampler")
UNIFORM_SAMPLERS = SAMPLERS.for_process("uniform", "uniform-state diffusion sampler")
D3PM_SAMPLERS = SAMPLERS.for_process("d3pm-absorbing", "d3pm sampler")
AR_SAMPLERS = SAMPLERS.for_process("causal", "autoregressive sampler")

__all__ = [
    "SAMPLERS",
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
