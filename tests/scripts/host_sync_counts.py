"""Prints the host synchronisations and network calls of every sampler of tests/synccount.py
(batch 1 and 3, seed 1) on the code it runs on: the figures of benchmarks/speed/README.md.

    python tests/scripts/host_sync_counts.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synccount import SAMPLERS, SyncCounter, draw  # noqa: E402

torch.set_num_threads(1)
for key in sorted(SAMPLERS):
    for num in (1, 3):
        calls = []
        with SyncCounter() as c:
            _, nfe = draw(key, num, invocations=calls)
        print(f"{key:24s} batch {num}: network calls {len(calls):3d} (nfe {nfe:3d}), syncs {c.total:3d} {dict(c.counts)}")
