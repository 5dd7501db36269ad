"""``metrics.jsonl`` as a resumed run finds it: what a crash left, trimmed to the checkpoint.

A run killed mid-write leaves a last line cut short, and a run killed after its last
checkpoint leaves lines for steps the resumed run will log again. Neither may stop the
resume: the cut line is dropped (it is one lost row of logging, nothing more) and so are
the lines past the checkpoint, so that no step appears twice.
"""

from __future__ import annotations

import json
from pathlib import Path

from dlm.fsio import atomic_write_text


def _step(line: str) -> int | None:
    """The step of one metrics line, or None for a line that is not a complete record."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, TypeError, KeyError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def read_metrics_lines(path: Path, keep_until: int) -> list[str]:
    """The complete lines of ``path`` whose step is at most ``keep_until`` (no newlines).

    A missing file has no lines; a partial or corrupt line, wherever it stands, is dropped.
    """
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if (step := _step(line)) is not None and step <= keep_until]


def trim_metrics(path: Path, keep_until: int) -> None:
    """Rewrite ``path`` to :func:`read_metrics_lines` (atomically) before a resumed run appends."""
    if Path(path).exists():
        atomic_write_text(path, "".join(line + "\n" for line in read_metrics_lines(path, keep_until)))
