"""Forward processes: one file each, registered by name."""

from dlm.processes.base import Process, low_discrepancy
from dlm.processes.masked import MaskedProcess
from dlm.registry import Registry

PROCESSES: Registry[type[Process]] = Registry("process")
PROCESSES.register("masked")(MaskedProcess)

__all__ = ["PROCESSES", "Process", "MaskedProcess", "low_discrepancy"]
