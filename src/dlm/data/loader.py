"""Fixed-length rows (blocks cut from the packed token stream, or prompt/response rows),
shuffled per epoch, resumable."""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any

import numpy as np
import torch

from dlm.batch import Batch


def as_blocks(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """(N, seq_len) view of consecutive blocks; the incomplete tail is dropped.

    A stream of several shards (``ShardedStream``) gives rows read lazily on indexing.
    """
    from dlm.data.cache import ShardedStream  # here: dlm.data.cache imports this package

    if isinstance(stream, ShardedStream):
        return stream.blocks(seq_len)
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


class BlockLoader:
    """Yields :class:`Batch` es of ``batch_size`` rows of ``rows`` (N, L) in a seeded
    per-epoch order, with their ``clean`` masks (N, L) when given (prompt/response data).
    With ``lengths`` (N,) given, each batch is cut to the longest of its rows' lengths (LLaDA's
    SFT batches: the end-of-text filling of the shorter rows goes only that far).

    Its whole state is ``(epoch, position)``: saved in checkpoints, it makes a resumed run
    see exactly the batches the uninterrupted run would have seen.
    """

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int, clean: np.ndarray | None = None,
                 lengths: np.ndarray | None = None):
        self.blocks = rows
        self.clean = clean
        self.lengths = lengths
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

    def next_batch(self) -> Batch:
        rows: list[int] = []
        while len(rows) < self.batch_size:
            order = self._epoch_order()
            take = order[self.position : self.position + self.batch_size - len(rows)]
            rows.extend(take.tolist())
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        x0 = torch.from_numpy(self.blocks[rows].astype(np.int64))  # (B, L)
        clean = None if self.clean is None else torch.from_numpy(np.asarray(self.clean[rows], dtype=bool))
        if self.lengths is not None:  # (B, L') with L' the batch's longest row
            width = int(self.lengths[rows].max())
            x0, clean = x0[:, :width], None if clean is None else clean[:, :width]
        return Batch(x0, clean)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


class PrefetchLoader:
    """A :class:`BlockLoader` read ahead by a background thread: ``depth`` batches are cut (and,
    with ``pin``, copied to pinned memory, so the copy to a GPU is asynchronous) while the
    current step runs. One thread draws them in the loader's own order, so the batches are
    those of the loader, bit for bit; each comes with the loader's state after it, and
    :meth:`state_dict` is the state after the last batch *handed out* (not the last one read
    ahead): a checkpoint resumes exactly where the consumer stopped. :meth:`load_state_dict`
    drops what was read ahead and starts again from the given state."""

    def __init__(self, loader: BlockLoader, depth: int = 2, pin: bool = False):
        self.loader, self.depth, self.pin = loader, depth, pin
        self._state = loader.state_dict()
        self._queue = None
        self._stop = None
        self._thread = None

    def next_batch(self) -> Batch:
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, self._state = item
        return batch

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.loader.load_state_dict(state)
        self._state = self.loader.state_dict()

    def close(self) -> None:
        """Stop the thread and drop what it read ahead (the loader's state is then that of
        the last batch handed out)."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
        self._thread = None
        self.loader.load_state_dict(self._state)

    def _start(self) -> None:
        self._queue, self._stop = queue.Queue(maxsize=self.depth), threading.Event()
        self._thread = threading.Thread(target=self._produce, name="dlm-prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self.loader.next_batch()
                item = (batch.pinned() if self.pin else batch, self.loader.state_dict())
            except Exception as err:  # noqa: BLE001 — handed to the consumer, raised there
                item = err
            while not self._stop.is_set():
                with contextlib.suppress(queue.Full):
                    self._queue.put(item, timeout=0.05)
                    break
            if isinstance(item, BaseException):
                return
