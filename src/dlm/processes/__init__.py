"""Forward processes, one file each. A family names its process class directly
(``DiffusionFamily.process_cls``): no string ever selects a process, so there is no registry."""

from dlm.processes.base import Process, low_discrepancy
from dlm.processes.masked import MaskedProcess
from dlm.processes.uniform import UniformProcess

__all__ = ["Process", "MaskedProcess", "UniformProcess", "low_discrepancy"]
