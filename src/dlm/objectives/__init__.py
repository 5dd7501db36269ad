"""Training objectives, one file per kind of process, in one registry: each registered under
its name for the processes it serves (``nelbo`` is one objective for masked diffusion and
another for uniform-state diffusion). ``causal`` is the autoregressive family's (no process)."""

from dlm.objectives.autoregressive import NextTokenCrossEntropy
from dlm.objectives.base import Corrupted, NoSettings, Objective, Scored, per_sequence
from dlm.objectives.discrete import D3PMHybrid
from dlm.objectives.gaussian import GaussianCrossEntropy, GaussianVlb
from dlm.objectives.hybrid import GiddClipped, GiddElbo
from dlm.objectives.masked import CountNelbo, LLaDACrossEntropy, MDLMNelbo
from dlm.objectives.uniform import SDDLM, NaiveDenoising, SDDLMInputNegative, SDDLMRandomNegatives, UniformNelbo
from dlm.registry import ComponentRegistry

OBJECTIVES: ComponentRegistry[type[Objective]] = ComponentRegistry("objective")
for _objective in (MDLMNelbo, LLaDACrossEntropy, CountNelbo):
    OBJECTIVES.register(_objective.name, processes=("masked",))(_objective)
for _objective in (UniformNelbo, NaiveDenoising, SDDLM, SDDLMRandomNegatives, SDDLMInputNegative):
    OBJECTIVES.register(_objective.name, processes=("uniform",))(_objective)
OBJECTIVES.register("hybrid", processes=("d3pm-absorbing", "d3pm-uniform"))(D3PMHybrid)
OBJECTIVES.register("ce", processes=("causal",))(NextTokenCrossEntropy)
for _objective in (GiddElbo, GiddClipped):
    OBJECTIVES.register(_objective.name, processes=("hybrid",))(_objective)
for _objective in (GaussianVlb, GaussianCrossEntropy):
    OBJECTIVES.register(_objective.name, processes=("gaussian",))(_objective)

# the per-family views of earlier versions (a family reads its own through ``Family.objectives``)
MASKED_OBJECTIVES = OBJECTIVES.for_process("masked", "masked-diffusion objective")
UNIFORM_OBJECTIVES = OBJECTIVES.for_process("uniform", "uniform-state diffusion objective")
D3PM_OBJECTIVES = OBJECTIVES.for_process("d3pm-absorbing", "d3pm objective")
AR_OBJECTIVES = OBJECTIVES.for_process("causal", "autoregressive objective")

__all__ = ["OBJECTIVES", "MASKED_OBJECTIVES", "UNIFORM_OBJECTIVES", "D3PM_OBJECTIVES", "D3PMHybrid", "AR_OBJECTIVES",
           "Objective", "Corrupted", "Scored", "NoSettings", "per_sequence", "UniformNelbo", "NaiveDenoising", "SDDLM",
           "SDDLMRandomNegatives", "SDDLMInputNegative", "MDLMNelbo", "CountNelbo", "LLaDACrossEntropy",
           "NextTokenCrossEntropy"]
