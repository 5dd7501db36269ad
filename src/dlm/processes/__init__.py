"""Forward processes, one file each, in one registry. A family names the processes it offers
(``Family.process_choices``: the run config's ``process:`` section picks one of them); the
objectives and samplers in :mod:`dlm.objectives` and :mod:`dlm.samplers` are registered for
the processes they serve, by these names."""

from dlm.processes.base import Process, log_uniform_mix, low_discrepancy, mix_density
from dlm.processes.discrete import AbsorbingD3PM, UniformD3PM
from dlm.processes.gaussian import GaussianProcess
from dlm.processes.hybrid import HybridProcess
from dlm.processes.masked import MaskedProcess
from dlm.processes.uniform import UniformProcess
from dlm.registry import Registry

PROCESSES: Registry[type[Process]] = Registry("process")
PROCESSES.register("masked")(MaskedProcess)
PROCESSES.register("uniform")(UniformProcess)
PROCESSES.register("d3pm-absorbing")(AbsorbingD3PM)
PROCESSES.register("d3pm-uniform")(UniformD3PM)
PROCESSES.register("hybrid")(HybridProcess)
PROCESSES.register("gaussian")(GaussianProcess)

__all__ = ["Process", "MaskedProcess", "UniformProcess", "AbsorbingD3PM", "UniformD3PM", "HybridProcess", "PROCESSES",
           "low_discrepancy", "log_uniform_mix", "mix_density"]
