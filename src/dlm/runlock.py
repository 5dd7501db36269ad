"""One writer per run folder: an exclusive ``flock`` on ``RUN_DIR/.lock``.

Two ``dlm train --resume`` on one run would both load the same checkpoint, both train
and overwrite each other's checkpoints and metrics. The writer holds this lock from
before it touches the folder until it has written its last checkpoint; a second writer
stops at once with one line naming the holder's pid. The kernel drops the lock when its
holder dies however it dies (SIGKILL, a power cut of an NFS client aside), so a killed
run never leaves its folder locked. Readers (``eval``, ``sample``) take no lock.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dlm.errors import DlmError
from dlm.fsio import FileSystemError, diagnose, ensure_dir, writing

LOCK = ".lock"
_HELD: set[Path] = set()  # run folders whose lock this process holds: run_lock nests


def holds_lock(run_dir: Path) -> bool:
    """Whether this process holds ``run_dir``'s lock."""
    return Path(run_dir).resolve() in _HELD


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s writer lock inside the block; creates the folder if needed.

    Raises DlmError at once if another process holds it. Nested use in one process is a
    no-op, so ``create_run_dir`` can take it whether or not its caller already did. A
    folder this call created and that holds nothing but the lock when the block ends
    (the run failed before writing anything) is removed again.
    """
    run_dir = Path(run_dir)
    if holds_lock(run_dir):
        yield
        return
    created = not run_dir.exists()
    ensure_dir(run_dir)
    fd = _acquire(run_dir)
    key = run_dir.resolve()
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        _release(run_dir, fd, remove_empty=created)


def _acquire(run_dir: Path) -> int:
    """A descriptor of ``run_dir/.lock`` holding its exclusive lock, stamped with our pid."""
    path = run_dir / LOCK
    while True:
        with writing(path, "open"):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DlmError(
                f"{run_dir} is in use by another dlm process (pid {holder}); wait for it or stop it"
            ) from None
        except OSError as e:
            os.close(fd)
            raise FileSystemError(f"cannot lock {path}: {diagnose(e, path)[1]}", e.errno) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder removed the file after we opened it: lock the new one
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _release(run_dir: Path, fd: int, remove_empty: bool) -> None:
    """Drop the lock; with ``remove_empty``, a folder left holding only the lock goes too."""
    try:
        if remove_empty and [p.name for p in run_dir.iterdir()] == [LOCK]:
            (run_dir / LOCK).unlink()  # while still locked: a writer that opened it retries on a new file
            run_dir.rmdir()
    except OSError:
        pass  # tidying only
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)
