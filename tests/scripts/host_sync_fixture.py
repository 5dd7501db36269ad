"""Writes tests/data/host_sync_tokens.json: the tokens every sampler of tests/synccount.py
draws (batch 1 and 3, seed 1), as the code of the commit it runs on makes them. It was run
once on the commit before the samplers were made free of host syncs (29eb02f); the test
checks that today's samplers still draw exactly those tokens.

    python tests/scripts/host_sync_fixture.py
"""

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from synccount import SAMPLERS, draw  # noqa: E402

torch.set_num_threads(1)
out = {f"{key}/{num}": draw(key, num)[0].tolist() for key in SAMPLERS for num in (1, 3)}
(HERE.parent / "data" / "host_sync_tokens.json").write_text(json.dumps(out, indent=0) + "\n")
print(len(out), "outputs written")
