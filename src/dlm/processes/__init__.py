"""Forward processes, one file each. A family with one process names its class directly
(``DiffusionFamily.process_cls``); a family that offers several chooses by the run config's
``process:`` section from its registry here."""

from dlm.processes.base import Process, log_uniform_mix, low_discrepancy, mix_density
from dlm.processes.discrete import AbsorbingD3PM, UniformD3PM
from dlm.processes.masked import MaskedProcess
from dlm.processes.uniform import UniformProcess
from dlm.registry import Registry

D3PM_PROCESSES: Registry[type[Process]] = Registry("d3pm process")
D3PM_PROCESSES.register("absorbing")(AbsorbingD3PM)
D3PM_PROCESSES.register("uniform")(UniformD3PM)

__all__ = ["Process", "MaskedProcess", "UniformProcess", "AbsorbingD3PM", "UniformD3PM", "D3PM_PROCESSES",
           "low_discrepancy", "log_uniform_mix", "mix_density"]
