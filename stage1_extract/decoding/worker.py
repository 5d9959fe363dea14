"""The decode worker process of :class:`~stage1_extract.decoding.pool.DecodePool`: tasks in, small results out.

A worker reads tasks from its own pipe, decodes each image straight into its row of the shared-memory
block, and before each image writes ``task_id << CELL_SHIFT | position`` into its progress cell (the block's
header), so that the parent knows which image it was on if it dies, and whether it is stuck. Only the
image's identity and failure reason go back through the pipe.

A worker is started as ``python -c BOOT`` (:class:`WorkerProcess`), not with :mod:`multiprocessing`: its spawn
start method re-imports the caller's ``__main__`` in every child, which re-runs a script written without an
``if __name__ == "__main__":`` guard (a script that extracts or trains would run again in every worker), fails
for code read from stdin (``FileNotFoundError: '<stdin>'``), and cannot start at all from a daemonic
``multiprocessing`` worker. ``BOOT`` only imports this module (from the same ``sys.path`` as the parent, the
folder this package was imported from first) and runs :func:`worker_main`; the caller's script is never
touched, and a plain subprocess may be started from anywhere, a daemonic worker included. It dies with its
parent (``PR_SET_PDEATHSIG``, and the pipe's end-of-file elsewhere).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

import numpy as np

from stage1_extract.decoding.shm import SharedBlock
from stage1_extract.errors import Stage1Error
from stage1_extract.model.preprocessing import Preprocessing

CELL_SHIFT = 20  # progress cell = task_id << 20 | position in the task: one aligned 64-bit store
BOOT = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
        "from stage1_extract.decoding.worker import child_main; child_main(int(sys.argv[2]))")
#: the folder this package was imported from: first on a worker's path, so it runs this very code
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class WorkersUnavailableError(Stage1Error, OSError):
    """No worker process can be started here (no interpreter to run, a sandbox that forbids processes)."""


class WorkerProcess:
    """One decode worker: ``pid``, ``sentinel`` (an fd readable once it has exited), ``exitcode`` (negative:
    the signal that ended it), ``is_alive()``, ``kill()``, ``join(timeout)``, ``close()`` — what the pool needs
    of a process. ``conn`` is the parent's end of its pipe; ``args`` are :func:`worker_main`'s arguments."""

    def __init__(self, args: tuple, name: str) -> None:
        if not sys.executable or getattr(sys, "frozen", False):
            raise WorkersUnavailableError("no Python interpreter to start decode workers with (sys.executable is "
                                          "empty or a frozen application, which would start itself again)")
        parent_end, child_end = socket.socketpair()
        sentinel_r, sentinel_w = os.pipe()  # the child holds the write end: EOF here once it has exited
        path = [_ROOT] + [p for p in sys.path if p != _ROOT]
        try:
            self._popen = subprocess.Popen(
                [sys.executable, "-c", BOOT, json.dumps(path), str(child_end.fileno()), str(sentinel_w)],
                pass_fds=(child_end.fileno(), sentinel_w), stdin=subprocess.DEVNULL)
        except OSError as exc:  # EAGAIN, EPERM (a sandbox), ENOENT (no interpreter there)
            parent_end.close()
            os.close(sentinel_r)
            raise WorkersUnavailableError(f"cannot start a decode worker process ({exc})") from exc
        finally:
            child_end.close()
            os.close(sentinel_w)
        self.name, self.pid, self.sentinel = name, self._popen.pid, sentinel_r
        self.conn = Connection(parent_end.detach())
        try:
            self.conn.send(args)
        except OSError:  # it died at once: its sentinel and exit code say so
            pass

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def kill(self) -> None:
        if self._popen.poll() is None:
            try:
                self._popen.kill()
            except ProcessLookupError:  # pragma: no cover - exited in between
                pass

    def join(self, timeout: float | None = None) -> None:
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """Close the parent's ends (after it has exited or been killed)."""
        self.conn.close()
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


def child_main(conn_fd: int) -> None:
    """A worker's entry point (``BOOT``): its arguments arrive first on its pipe."""
    conn = Connection(conn_fd)
    try:
        args = conn.recv()
    except (EOFError, OSError):  # the parent is gone
        return
    worker_main(conn, *args)


def _die_with_parent(parent_pid: int, signal_too: bool) -> None:
    """Stop this worker when its parent dies (e.g. ``kill -9`` of the run), so none linger: a thread that checks
    the parent every second and, where the parent's starting thread lives as long as the pool
    (``signal_too``), Linux's SIGKILL at the parent's death (``PR_SET_PDEATHSIG``, sent when the *thread* that
    started the worker ends: not for a replacement started by the pool's dispatcher thread, which ends with
    each run)."""
    if signal_too:
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # not Linux: the watch below and the pipe's end-of-file
            pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_main(conn, position, shm_name, n_rows, size, prep_dict, draft, parent_pid, pdeathsig=True):
    # The parent handles Ctrl-C and SIGTERM (sent to the whole process group) and stops us itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent_pid, pdeathsig)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        return
    from stage1_extract.decoding.image import decode_file

    prep = Preprocessing.from_dict(prep_dict)
    shm = SharedBlock.attach(shm_name)
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
