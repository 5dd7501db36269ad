"""Forward processes: one file each, registered by name."""

from dlm.processes.base import Process, low_discrepancy
from dlm.processes.masked import MaskedProcess
from dlm.processes.uniform import UniformProcess
from dlm.registry import Registry

PROCESSES: Registry[type[Process]] = Registry("process")
PROCESSES.register("masked")(MaskedProcess)
PROCESSES.register("uniform")(UniformProcess)

__all__ = ["PROCESSES", "Process", "MaskedProcess", "UniformProcess", "low_discrepancy"]
