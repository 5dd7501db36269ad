"""Training objectives, one file per family, registered by name per family."""

from dlm.objectives.autoregressive import NextTokenCrossEntropy
from dlm.objectives.discrete import D3PMHybrid
from dlm.objectives.base import Corrupted, NoSettings, Objective, Scored, per_sequence
from dlm.objectives.masked import CountNelbo, LLaDACrossEntropy, MDLMNelbo
from dlm.objectives.uniform import SDDLM, NaiveDenoising, SDDLMInputNegative, SDDLMRandomNegatives, UniformNelbo
from dlm.registry import Registry

MASKED_OBJECTIVES: Registry[type[Objective]] = Registry("masked-diffusion objective")
for _objective in (MDLMNelbo, LLaDACrossEntropy, CountNelbo):
    MASKED_OBJECTIVES.register(_objective.name)(_objective)

UNIFORM_OBJECTIVES: Registry[type[Objective]] = Registry("uniform-state diffusion objective")
for _objective in (UniformNelbo, NaiveDenoising, SDDLM, SDDLMRandomNegatives, SDDLMInputNegative):
    UNIFORM_OBJECTIVES.register(_objective.name)(_objective)

D3PM_OBJECTIVES: Registry[type[Objective]] = Registry("d3pm objective")
D3PM_OBJECTIVES.register("hybrid")(D3PMHybrid)

AR_OBJECTIVES: Registry[type[Objective]] = Registry("autoregressive objective")
AR_OBJECTIVES.register("ce")(NextTokenCrossEntropy)

__all__ = ["MASKED_OBJECTIVES", "UNIFORM_OBJECTIVES", "D3PM_OBJECTIVES", "D3PMHybrid", "AR_OBJECTIVES", "Objective", "Corrupted", "Scored",
           "NoSettings", "per_sequence", "UniformNelbo", "NaiveDenoising", "SDDLM", "SDDLMRandomNegatives",
           "SDDLMInputNegative", "MDLMNelbo", "CountNelbo", "LLaDACrossEntropy", "NextTokenCrossEntropy"]
