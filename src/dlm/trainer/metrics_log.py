"""``metrics.jsonl`` (and TensorBoard, when installed): :class:`MetricsLog`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dlm.metrics import trim_metrics


class MetricsLog:
    """``metrics.jsonl`` (and TensorBoard, when installed) of one run; a no-op when disabled
    (every rank but 0). Lines past ``keep_until`` — a crashed run's — are dropped first."""

    def __init__(self, run_dir: Path, keep_until: int, enabled: bool = True):
        self.file = self.tb = None
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        trim_metrics(path, keep_until)  # a crashed run's lines past the checkpoint, and a torn last line
        self.file = open(path, "a", encoding="utf-8")
        try:  # never required
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:
            self.tb = None

    def write(self, rec: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        if self.tb is not None:
            for key, value in rec.items():
                if key != "step":
                    self.tb.add_scalar(key, value, rec["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
