"""Model families, registered by the name given to ``--family``."""

from dlm.families.autoregressive import Autoregressive
from dlm.families.base import Family
from dlm.families.mdlm import MDLM
from dlm.families.usdm import USDM
from dlm.registry import Registry

FAMILIES: Registry[type[Family]] = Registry("family")
FAMILIES.register("mdlm")(MDLM)
FAMILIES.register("ar")(Autoregressive)
FAMILIES.register("usdm")(USDM)

__all__ = ["FAMILIES", "Family", "MDLM", "Autoregressive", "USDM"]
