"""Fixed-length blocks cut from the packed token stream, shuffled per epoch, resumable."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def as_blocks(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """(N, seq_len) view of consecutive blocks; the incomplete tail is dropped."""
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


class BlockLoader:
    """Yields (batch_size, seq_len) int64 batches of blocks in a seeded per-epoch order.

    Its whole state is ``(epoch, position)``: saved in checkpoints, it makes a resumed run
    see exactly the batches the uninterrupted run would have seen.
    """

    def __init__(self, stream: np.ndarray, seq_len: int, batch_size: int, seed: int):
        self.blocks = as_blocks(stream, seq_len)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order: torch.Tensor | None = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(len(self.blocks), generator=g)
        return self._order

    def next_batch(self) -> torch.Tensor:
        rows: list[int] = []
        while len(rows) < self.batch_size:
            order = self._epoch_order()
            take = order[self.position : self.position + self.batch_size - len(rows)]
            rows.extend(take.tolist())
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return torch.from_numpy(self.blocks[rows].astype(np.int64))  # (B, T)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None
