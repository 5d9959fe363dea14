"""The decode worker process of :class:`~stage1_extract.decoding.pool.DecodePool`: tasks in, small results out.

A worker reads tasks from its own pipe, decodes each image straight into its row of the shared-memory
block, and before each image writes ``task_id << CELL_SHIFT | position`` into its progress cell (the block's
header), so that the parent knows which image it was on if it dies, and whether it is stuck. Only the
image's identity and failure reason go back through the pipe.
"""

from __future__ import annotations

import os
import signal
import time
from multiprocessing import shared_memory

import numpy as np

from stage1_extract.model.preprocessing import Preprocessing

CELL_SHIFT = 20  # progress cell = task_id << 20 | position in the task: one aligned 64-bit store


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when its parent dies (e.g. ``kill -9`` of the run), so none linger."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pipe's end-of-file stops the worker instead
        pass


def worker_main(conn, position, shm_name, n_rows, size, prep_dict, draft, parent_pid):
    # The parent handles Ctrl-C and SIGTERM (sent to the whole process group) and stops us itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        return
    from stage1_extract.decoding.image import decode_file

    prep = Preprocessing.from_dict(prep_dict)
    shm = shared_memory.SharedMemory(name=shm_name)
    cells = np.ndarray((position + 1,), dtype=np.int64, buffer=shm.buf)  # the header: one cell per worker
    rows = np.ndarray((n_rows, size, size, 3), dtype=np.uint8, buffer=shm.buf, offset=header_bytes())
    try:
        while True:
            try:
                task = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                break
            if task is None:
                break
            task_id, items = task
            t0 = time.perf_counter()
            out = []
            for k, (index, row, path) in enumerate(items):
                cells[position] = (task_id << CELL_SHIFT) | k
                got = decode_file(path, prep, rows[row], draft=draft)
                out.append((index, got.reason, got.transient, got.content_id, got.file_size, got.mtime_ns))
            conn.send((task_id, out, time.perf_counter() - t0))
    finally:
        del cells, rows
        shm.close()


MAX_WORKERS = 1024


def header_bytes() -> int:
    return MAX_WORKERS * 8  # progress cells, one per worker position (a multiple of 64: rows stay aligned)
