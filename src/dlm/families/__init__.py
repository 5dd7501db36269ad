"""Model families, registered by the name given to ``--family``."""

from dlm.schema import RunConfig
from dlm.families.autoregressive import Autoregressive
from dlm.families.base import Family
from dlm.families.d3pm import D3PM
from dlm.families.diffusion import DiffusionFamily
from dlm.families.gidd import Gidd
from dlm.families.gaussian import GaussianDiffusion
from dlm.families.mdlm import MDLM
from dlm.families.usdm import USDM
from dlm.registry import Registry

FAMILIES: Registry[type[Family]] = Registry("family")
FAMILIES.register("mdlm")(MDLM)
FAMILIES.register("ar")(Autoregressive)
FAMILIES.register("usdm")(USDM)
FAMILIES.register("d3pm")(D3PM)
FAMILIES.register("gidd")(Gidd)  # GIDD's mask + uniform hybrid (docs/gidd.md): a preset and its tail below ε
FAMILIES.register("gaussian")(GaussianDiffusion)  # Gaussian embedding diffusion (docs/gaussian.md)


def resolve_components(cfg: RunConfig) -> None:
    """Check the family and its objective's and sampler's settings (the one place), and
    record every setting, defaults included, in ``cfg``."""
    FAMILIES.get(cfg.family).resolve(cfg)


__all__ = ["FAMILIES", "Family", "MDLM", "Autoregressive", "USDM", "D3PM", "Gidd", "resolve_components"]
