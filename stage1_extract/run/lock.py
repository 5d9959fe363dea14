"""One writer per output directory: an advisory ``flock`` on ``OUT.meta/lock`` (beside the shards, not among them).

The kernel drops the lock when the holder dies (even by ``kill -9``), so a crashed run never leaves a
stale lock behind; a second live run gets a clear error naming the holder's pid, or waits for it (``wait``
seconds at most: callers that share one output, such as predictions sharing a feature cache). The lock follows
the folder's real path, so ``--out features`` and ``--out link-to-features`` are one output with one lock.
An output that cannot be written at all (read-only shards, a read-only mount) takes no lock: the lock says so
(:attr:`OutputLock.read_only`) and the run may only read (a no-op rerun), see :mod:`stage1_extract.run.lifecycle`.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from pathlib import Path

from shardformat.layout import meta_file, require_folder
from stage1_extract.errors import Stage1Error

log = logging.getLogger(__name__)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
_POLL_SECONDS = 0.2


class OutputLockedError(Stage1Error, RuntimeError):
    """Another run is writing to the same output directory."""


class OutputLock:
    """``with OutputLock(out, wait=0):`` holds the lock of ``out``; ``wait``: seconds to wait for another run."""

    def __init__(self, out: str, *, wait: float = 0.0) -> None:
        self.out = Path(os.path.realpath(os.path.expanduser(os.fspath(out))))
        self.path = Path(meta_file(str(self.out), "lock"))
        self.wait = max(0.0, float(wait or 0))
        self.read_only: str | None = None  # why no lock could be created: the output cannot be written
        self._fd: int | None = None

    def _open(self) -> int | None:
        """The lock file, opened (created when missing); None when the output cannot be written."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno not in _NOT_WRITABLE or not self.out.is_dir():
                raise
            reason = f"cannot create {exc.filename or self.path}: {exc.strerror}"
        try:
            return os.open(self.path, os.O_RDONLY)  # a read-only lock file still locks
        except OSError:
            self.read_only = reason
            return None

    def __enter__(self) -> "OutputLock":
        require_folder(self.out)
        fd = self._open()
        if fd is None:
            return self
        deadline, said = time.monotonic() + self.wait, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                if time.monotonic() >= deadline:
                    os.close(fd)
                    waited = f" (waited {self.wait:g} s)" if self.wait else ""
                    raise OutputLockedError(
                        f"{self.out} is in use by another stage1-extract run (pid {holder}){waited}; "
                        "wait for it to finish or choose another --out"
                    ) from None
                if not said:
                    log.warning("%s is in use by another stage1-extract run (pid %s): waiting up to %g s for it "
                                "to finish", self.out, holder, self.wait)
                    said = True
                time.sleep(min(_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # a read-only lock file: locked all the same, without the pid
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
