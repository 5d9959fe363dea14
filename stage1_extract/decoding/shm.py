"""The decode pool's shared memory, reserved up front so that a small ``/dev/shm`` is found at start.

POSIX shared memory lives in ``/dev/shm``, a tmpfs that containers often make small (Docker: 64 MiB, some
CI runners: a few MiB). Its pages are only allocated when first written, so a block larger than the space
left is created without complaint and the first worker to write past the end dies of SIGBUS. Here every
byte is reserved with ``posix_fallocate`` when the block is created: if it does not fit, the pool uses
fewer slots, then smaller slots (smaller batches), and says so naming ``/dev/shm`` and the fix; if not even
two one-image slots fit, it stops with that message before any work is done.
"""

from __future__ import annotations

import errno
import logging
import os
from multiprocessing import shared_memory

from stage1_extract.errors import Stage1Error

log = logging.getLogger(__name__)
SHM_DIR = "/dev/shm"
FIX = ("make /dev/shm larger (docker run --shm-size=2g …, or as root: mount -o remount,size=2G /dev/shm) "
       "or free space in it")


class SharedMemoryTooSmallError(Stage1Error, RuntimeError):
    """``/dev/shm`` cannot hold even the smallest decode buffers."""


def shm_free_bytes() -> int | None:
    """Space left in ``/dev/shm`` (None where there is no such tmpfs)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _reserve(size: int) -> shared_memory.SharedMemory | None:
    """A block of ``size`` bytes with every page allocated, or None when shared memory has no room for it."""
    try:
        shm = shared_memory.SharedMemory(create=True, size=size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM):
            return None
        raise
    try:
        os.posix_fallocate(shm._fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            shm.close()
            shm.unlink()
            return None
        # EOPNOTSUPP and friends: not a tmpfs we can reserve in; the block works, unreserved
    except AttributeError:  # pragma: no cover - no fd (not POSIX)
        pass
    return shm


def allocate_slots(header: int, row_bytes: int, slots: int, rows: int, *, min_slots: int = 2):
    """(shared memory block, slots, rows per slot): ``header`` bytes then ``slots × rows`` rows, as many of
    the wanted slots and rows as ``/dev/shm`` holds."""
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
