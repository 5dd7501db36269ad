"""Writing files at the edges: atomically, with the user's umask, failing in one line.

Every file dlm leaves behind (run folders, checkpoints, the token cache) goes through
here, so that three promises hold everywhere:

* a reader never sees half a file: text is written to a temporary name and renamed;
* colleagues can read a run: temporary files and folders are created with modes 0666 /
  0777 and the kernel applies the umask, as for any other file (``tempfile`` would
  create them 0600 / 0700 whatever the umask);
* a full disk, a read-only place or a path under a file ends in one line naming the path
  and the cause (``cannot write RUN/config.yaml: no space left on device``), not a
  traceback.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dlm.errors import DlmError

HOST = socket.gethostname()
FULL_BELOW = 16 << 20  # bytes free under which a failed write is put down to a full disk


class FileSystemError(DlmError, OSError):
    """A write the file system refused, reported as one line.

    Still an ``OSError`` carrying the cause's ``errno``, so library callers can tell a full
    disk (``errno.ENOSPC``) from a read-only one.
    """

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.message, self.errno = message, errno_

    def __str__(self) -> str:
        return self.message


def _free_bytes(path: Path) -> int | None:
    for folder in (Path(path), *Path(path).parents):
        try:
            st = os.statvfs(folder)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


def diagnose(e: BaseException, path: Path) -> tuple[int | None, str]:
    """(errno, ``no space left on device``): why a write to ``path`` failed, as a sentence's tail.

    torch.save and safetensors report a full disk as RuntimeError / SafetensorError without
    an errno; a write that failed on a (nearly) full file system is put down to that.
    """
    if isinstance(e, OSError) and e.strerror:
        return e.errno, e.strerror[:1].lower() + e.strerror[1:]
    free = _free_bytes(path)
    if free is not None and free < FULL_BELOW:
        return errno.ENOSPC, os.strerror(errno.ENOSPC).lower()
    return getattr(e, "errno", None), (str(e).strip().splitlines() or [type(e).__name__])[0]


@contextmanager
def writing(path: Path, what: str = "write", also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn an OSError (or one of ``also``) raised inside into ``cannot write PATH: CAUSE``."""
    try:
        yield
    except FileSystemError:
        raise
    except (OSError, *also) as e:
        code, cause = diagnose(e, path)
        raise FileSystemError(f"cannot {what} {path}: {cause}", code) from None


def ensure_dir(path: Path) -> None:
    """Create folder ``path`` (and its parents), or say in one line why it cannot be."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DlmError(f"{path} is a file, not a folder: choose another path")
    with writing(path, "create"):
        path.mkdir(parents=True, exist_ok=True)


def temp_name(parent: Path, prefix: str) -> Path:
    """A fresh name in ``parent`` that says who writes it: ``PREFIX<pid>-<random>-<host>``.

    The pid and host let a later process tell a dead writer's leftovers from a live
    writer's work in progress (see :func:`writer_is_gone`).
    """
    return Path(parent) / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}-{HOST}"


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (no race with threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """Give a file some library created 0600 (safetensors does) the mode 0666 less the umask."""
    os.chmod(path, 0o666 & ~current_umask())


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder under ``parent``, mode 0777 less the umask."""
    path = temp_name(parent, prefix)
    with writing(path, "create"):
        os.mkdir(path, 0o777)
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half.

    The file gets mode 0666 less the umask, like any file the user creates.
    """
    path = Path(path)
    ensure_dir(path.parent)
    tmp = temp_name(path.parent, f".{path.name}.")
    with writing(path):
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def writer_is_gone(tmp: Path, prefix: str, idle_after_s: float, now: float) -> bool:
    """Whether temporary folder ``tmp`` (named by :func:`temp_name`) was left by a dead writer.

    On this host its pid decides: a live writer keeps its folder however long it works (a
    reused pid only delays the clean-up). A folder of another host (a cache shared over
    NFS), or an older one without a pid, is left once nothing in it has changed for
    ``idle_after_s`` seconds.
    """
    pid, _, rest = tmp.name[len(prefix):].partition("-")
    if rest.partition("-")[2] == HOST and pid.isdigit():
        return not pid_alive(int(pid))
    try:
        last = max([tmp.stat().st_mtime, *(f.stat().st_mtime for f in tmp.iterdir())])
    except OSError:  # renamed into place or removed meanwhile: not a leftover
        return False
    return now - last > idle_after_s
