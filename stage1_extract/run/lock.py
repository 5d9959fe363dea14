"""One writer per output directory: an advisory ``flock`` on ``OUT.meta/lock`` (beside the shards, not among them).

The kernel drops the lock when the holder dies (even by ``kill -9``), so a crashed run never leaves a
stale lock behind; a second live run gets a clear error naming the holder's pid.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from shardformat.layout import meta_file, require_folder
from stage1_extract.errors import Stage1Error


class OutputLockedError(Stage1Error, RuntimeError):
    """Another run is writing to the same output directory."""


class OutputLock:
    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.path = Path(meta_file(out, "lock"))
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        require_folder(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputLockedError(
                f"{self.out} is in use by another stage1-extract run (pid {holder}); "
                "wait for it to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        _drop_legacy_lock(self.out / "_lock")
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _drop_legacy_lock(path: Path) -> None:
    """Remove the ``OUT/_lock`` older versions left among the shards (it breaks ``pl.read_parquet(OUT)``),
    unless an older run still holds it."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink()
    except OSError:
        pass
    finally:
        os.close(fd)
