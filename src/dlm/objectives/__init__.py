"""Training objectives, one file per family, registered by name per family."""

from dlm.objectives.autoregressive import NextTokenCrossEntropy
from dlm.objectives.masked import CountNelbo, LLaDACrossEntropy, MDLMNelbo
from dlm.objectives.uniform import SDDLM, NaiveDenoising, SDDLMInputNegative, SDDLMRandomNegatives, UniformNelbo
from dlm.registry import Registry

MASKED_OBJECTIVES: Registry[type] = Registry("masked-diffusion objective")
MASKED_OBJECTIVES.register("nelbo")(MDLMNelbo)
MASKED_OBJECTIVES.register("llada")(LLaDACrossEntropy)
MASKED_OBJECTIVES.register("nelbo-count")(CountNelbo)

UNIFORM_OBJECTIVES: Registry[type] = Registry("uniform-state diffusion objective")
for _objective in (UniformNelbo, NaiveDenoising, SDDLM, SDDLMRandomNegatives, SDDLMInputNegative):
    UNIFORM_OBJECTIVES.register(_objective.name)(_objective)

AR_OBJECTIVES: Registry[type] = Registry("autoregressive objective")
AR_OBJECTIVES.register("ce")(NextTokenCrossEntropy)

__all__ = ["MASKED_OBJECTIVES", "UNIFORM_OBJECTIVES", "UniformNelbo", "NaiveDenoising", "SDDLM", "SDDLMRandomNegatives", "SDDLMInputNegative", "AR_OBJECTIVES", "MDLMNelbo", "CountNelbo", "LLaDACrossEntropy", "NextTokenCrossEntropy"]
