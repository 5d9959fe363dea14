"""The decode pool's shared memory, reserved up front so that a small ``/dev/shm`` is found at start.

POSIX shared memory lives in ``/dev/shm``, a tmpfs that containers often make small (Docker: 64 MiB, some
CI runners: a few MiB). Its pages are only allocated when first written, so a block larger than the space
left is created without complaint and the first worker to write past the end dies of SIGBUS. Here every
byte is reserved with ``posix_fallocate`` when the block is created: if it does not fit, the pool uses
fewer slots, then smaller slots (smaller batches), and says so naming ``/dev/shm`` and the fix; if not even
two one-image slots fit, it stops with that message before any work is done.

A block is a file ``/dev/shm/stage1-decode-<owner pid>-<random>`` mapped by the parent and its workers
(not :mod:`multiprocessing.shared_memory`, whose resource-tracker process, when the out-of-memory killer or a
``kill -9`` of the process group takes it, ends the run in ``KeyError: '/psm_…'`` or leaves the block behind
for ever). Every process that maps a block holds a shared ``flock`` on it, which the kernel drops when the
process dies however it dies; creating a block first deletes the blocks nobody holds whose owner is gone, so
what a killed run left in ``/dev/shm`` goes at the next run's start.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import logging
import mmap
import os
import secrets
import tempfile
import time

from stage1_extract.errors import Stage1Error

log = logging.getLogger(__name__)
SHM_DIR = "/dev/shm"
PREFIX = "stage1-decode-"
STALE_AFTER = 60.0  # seconds: a block nobody holds whose owner is still alive is only swept after this
FIX = ("make /dev/shm larger (docker run --shm-size=2g …, or as root: mount -o remount,size=2G /dev/shm) "
       "or free space in it")


class SharedMemoryTooSmallError(Stage1Error, RuntimeError):
    """``/dev/shm`` cannot hold even the smallest decode buffers."""


class SharedMemoryError(Stage1Error, OSError):
    """The decode buffers cannot be created or mapped at all (not a question of size)."""


def shm_dir() -> str:
    """Where blocks live: ``/dev/shm`` (a tmpfs), or the temporary folder where there is none (macOS)."""
    return SHM_DIR if os.path.isdir(SHM_DIR) else tempfile.gettempdir()


def shm_free_bytes() -> int | None:
    """Space left in ``/dev/shm`` (None where there is no such tmpfs)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class SharedBlock:
    """One mapped block: ``buf`` (a writable buffer), ``name`` (its path, what a worker attaches to)."""

    def __init__(self, name: str, fd: int, size: int) -> None:
        self.name, self._fd, self.size = name, fd, size
        self._mmap = mmap.mmap(fd, size)  # on failure the caller closes fd
        self.buf = memoryview(self._mmap)

    @classmethod
    def attach(cls, name: str) -> "SharedBlock":
        """Map an existing block (a decode worker does this), holding its shared lock while mapped."""
        fd = os.open(name, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return cls(name, fd, os.fstat(fd).st_size)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        """Unmap (a ``BufferError`` if arrays still view it: the mapping then goes with them) and drop the lock."""
        if self._mmap is None:
            return
        self.buf.release()
        self._mmap.close()
        self._mmap = None
        os.close(self._fd)

    def unlink(self) -> None:
        try:
            os.unlink(self.name)
        except FileNotFoundError:
            pass


def _owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale(directory: str | None = None) -> list[str]:
    """Delete the blocks no live process maps (their lock is free) and whose owner is gone or which are older
    than :data:`STALE_AFTER`: what a ``kill -9`` left behind. Returns the paths deleted."""
    gone = []
    for path in glob.glob(os.path.join(directory or shm_dir(), PREFIX + "*")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            pid = path.rsplit("/", 1)[-1][len(PREFIX):].split("-", 1)[0]
            owner_gone = not pid.isdigit() or not _owner_alive(int(pid))
            if st.st_uid != os.getuid() or not (owner_gone or time.time() - st.st_mtime > STALE_AFTER):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # mapped by a live process
                continue
            os.unlink(path)
            gone.append(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    if gone:
        log.info("deleted %d decode buffer(s) left in %s by runs that were killed", len(gone), shm_dir())
    return gone


def _reserve(size: int) -> SharedBlock | None:
    """A block of ``size`` bytes with every page allocated, or None when shared memory has no room for it."""
    directory = shm_dir()
    name = os.path.join(directory, f"{PREFIX}{os.getpid()}-{secrets.token_hex(6)}")
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM):
            return None
        raise SharedMemoryError(f"cannot create the decode buffers in {directory} ({exc}); check that it is "
                                f"writable, or {FIX}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # held while mapped: sweep_stale never takes a live block
        os.ftruncate(fd, size)
        try:
            os.posix_fallocate(fd, 0, size)
        except AttributeError:  # pragma: no cover - not POSIX
            pass
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise
            # EOPNOTSUPP and friends: not a tmpfs we can reserve in; the block works, unreserved
        return SharedBlock(name, fd, size)
    except OSError as exc:
        os.close(fd)
        os.unlink(name)
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            return None
        raise SharedMemoryError(f"cannot map {size / 2**20:.1f} MiB of decode buffers in {directory} "
                                f"({exc}): {FIX}") from exc


def allocate_slots(header: int, row_bytes: int, slots: int, rows: int, *, min_slots: int = 2):
    """(shared memory block, slots, rows per slot): ``header`` bytes then ``slots × rows`` rows, as many of
    the wanted slots and rows as ``/dev/shm`` holds (after deleting what killed runs left there)."""
    sweep_stale()
    shm = _reserve(header + slots * rows * row_bytes)
    if shm is not None:
        return shm, slots, rows
    free = shm_free_bytes() or 0
    usable = int(free * 0.9) - header  # leave room for the next process that needs a little
    fit_slots = min(slots - 1, usable // (rows * row_bytes)) if usable > 0 else 0
    if fit_slots >= min_slots:
        shape = (fit_slots, rows)
        what = f"{fit_slots} batch buffers instead of {slots} (decoding overlaps inference less)"
    else:
        fit_rows = min(rows - 1, usable // (min_slots * row_bytes)) if usable > 0 else 0
        if fit_rows < 1:
            raise SharedMemoryTooSmallError(
                f"{SHM_DIR} has {free / 2**20:.1f} MiB free, too little for the decode buffers "
                f"({min_slots} × {row_bytes / 2**20:.2f} MiB at least, {slots * rows * row_bytes / 2**20:.0f} "
                f"MiB wanted): {FIX}")
        shape = (min_slots, fit_rows)
        what = f"batches of {fit_rows} images instead of {rows}"
    log.warning("%s has only %.1f MiB free for %.0f MiB of decode buffers: using %s. To avoid this, %s.",
                SHM_DIR, free / 2**20, (slots * rows * row_bytes) / 2**20, what, FIX)
    shm = _reserve(header + shape[0] * shape[1] * row_bytes)
    if shm is None:
        raise SharedMemoryTooSmallError(f"{SHM_DIR} filled up while the decode buffers were reserved: {FIX}")
    return shm, shape[0], shape[1]
