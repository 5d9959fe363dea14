"""Parallel decoding into shared-memory batches that overlap inference, robust to any worker dying.

Worker processes decode images straight into a fixed ring of batch slots in one shared-memory block; only
small per-image records (identity, error reason) travel back, never pixel arrays. A batch is split into
small tasks (16–32 images) that every worker fills into the same slot, so any batch size keeps every worker
busy and the first batch is ready after about ``batch / workers`` images per worker.

The parent owns all dispatch, in a thread of its own so that workers get new work while the caller runs
inference: each worker has its own pipe (no shared queue, so no lock a dead worker can
hold) and a progress cell in shared memory saying which image it is on. The parent knows every item it
handed out; when a worker dies it reads the cell, re-dispatches the unfinished images, retries the one the
worker died on alone, and records it only if that kills a worker again — with the signal as the reason.
A watchdog stops a worker stuck on one image, so a run can never wait forever. See ``_on_death`` for which
deaths are the file's fault and which are retried next run.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from multiprocessing import connection
from typing import Iterator, Sequence

import numpy as np

from stage1_extract.decoding.worker import CELL_SHIFT as _CELL_SHIFT
from stage1_extract.decoding.worker import MAX_WORKERS as _MAX_WORKERS
from stage1_extract.decoding.worker import header_bytes as _header_bytes
from stage1_extract.decoding.worker import WorkerProcess, WorkersUnavailableError  # noqa: F401  (raised here)
from stage1_extract.decoding.batches import Batch, ItemResult
from stage1_extract.decoding.pool_tasks import BatchState, Task, WorkerHandle, death_cause, death_reason
from stage1_extract.errors import Stage1Error
from stage1_extract.model.preprocessing import Preprocessing
from stage1_extract.decoding.shm import allocate_slots

log = logging.getLogger(__name__)

#: Images per task: small enough to spread one batch over every worker, large enough that the pipe round
#: trip (~0.1 ms) is noise next to decoding (~1–25 ms an image).
MIN_TASK, MAX_TASK = 16, 32
#: Tasks handed to a worker ahead of the one it decodes, so it never waits for the parent between tasks.
DEPTH = 2
#: Seconds one image may take before the watchdog stops its worker (a hung decoder or file system).
ITEM_TIMEOUT = float(os.environ.get("STAGE1_DECODE_TIMEOUT", "300"))
STARTUP_TIMEOUT = 120.0  # seconds a new worker may take to import and take its first task


class DecodePoolError(Stage1Error, RuntimeError):
    """The decode pool cannot go on (workers die at start, or shared memory fails); finished shards are kept."""


def _decode_one(path: str, prep: Preprocessing, draft: bool, out: np.ndarray):
    """(reason, content_id, size, mtime) of decoding ``path`` into ``out`` — kept for callers of the old API."""
    from stage1_extract.decoding.image import decode_file

    got = decode_file(path, prep, out, draft=draft)
    return got.reason, got.content_id, got.file_size, got.mtime_ns


class DecodePool:
    """``for batch in pool.run(paths): ...`` yields decoded batches in completion order.

    A batch's pixels stay valid until the loop asks for the next batch; then its slot is reused. Every
    path comes back exactly once, in some batch, with its pixels or a reason.
    """

    def __init__(self, prep: Preprocessing, *, batch_size: int, workers: int, slots: int | None = None,
                 draft: bool = False, task_size: int | None = None, item_timeout: float | None = None) -> None:
        self.prep = prep
        self.workers = max(1, min(workers, _MAX_WORKERS))
        self.draft = draft
        self.item_timeout = item_timeout or ITEM_TIMEOUT
        size = prep.input_size
        row_bytes = size * size * 3
        want_rows = max(1, batch_size)
        task = min(want_rows, task_size or min(MAX_TASK, max(MIN_TASK, -(-want_rows // self.workers))))
        # Slots being filled (every worker holds DEPTH tasks) + one being inferred + one ready for it; small
        # batches get the slack of 2 per worker (as many as 64 MiB holds), which evens out bursty decoding.
        filling = -(-self.workers * DEPTH * task // want_rows)
        slack = min(2 * self.workers + 1, (64 << 20) // (want_rows * row_bytes))
        want_slots = slots or max(3, filling + 2, slack)
        self._shm, self.n_slots, self.batch_size = allocate_slots(
            _header_bytes(), row_bytes, want_slots, want_rows, min_slots=2 if slots is None else slots)
        self.task_size = max(1, min(task, self.batch_size))
        self.shape = (self.batch_size, size, size, 3)
        self._rows = np.ndarray((self.n_slots * self.batch_size, size, size, 3), dtype=np.uint8,
                                buffer=self._shm.buf, offset=_header_bytes())
        self._cells = np.ndarray((_MAX_WORKERS,), dtype=np.int64, buffer=self._shm.buf)
        self._cells[:] = -1
        self._owner = threading.current_thread()  # lives as long as the pool (the dispatcher thread does not)
        self._workers: dict[int, WorkerHandle] = {}  # position -> worker
        self._deaths_without_progress = 0
        self._bus_errors = 0
        self._next_task_id = 0
        self._active = None  # (stop event, wake-up pipe, thread) of the run in progress
        try:
            for position in range(self.workers):
                self._spawn(position)
        except BaseException:  # e.g. Ctrl-C while starting: no worker or shared memory left behind
            self.close()
            raise

    # -------------------------------------------------------------------------------------------- workers

    def _spawn(self, position: int) -> None:
        """Start the worker at ``position`` (a clean ``python -c``: the caller's ``__main__`` is never run, see
        :mod:`~stage1_extract.decoding.worker`); :class:`WorkersUnavailableError` where none can start."""
        proc = WorkerProcess((position, self._shm.name, len(self._rows), self.prep.input_size,
                              self.prep.to_dict(), self.draft, os.getpid(),
                              threading.current_thread() is self._owner), name=f"stage1-decode-{position}")
        self._cells[position] = -1
        self._workers[position] = WorkerHandle(proc, proc.conn, position)

    def worker_pids(self) -> list[int]:
        """Process ids of the live decode workers (for monitoring and fault tests)."""
        return [w.proc.pid for w in list(self._workers.values())]

    # ------------------------------------------------------------------------------------------------ run

    def run(self, paths: Sequence[str]) -> Iterator[Batch]:
        """Decoded batches of ``paths``, in completion order; every path comes back exactly once.

        A dispatcher thread owns the workers (dispatch, deaths, watchdog), so they are kept busy while the
        caller runs inference on a batch; the caller's loop only takes finished batches and hands slots back.
        """
        for position, w in list(self._workers.items()):
            if w.tasks:  # stopped when an earlier run was abandoned
                self._replace(position)
        out: queue.Queue = queue.Queue()
        released: collections.deque[int] = collections.deque()  # slots the caller is done with
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        stop = threading.Event()
        thread = threading.Thread(target=self._serve, args=(paths, out, released, wake_r, stop),
                                  name="stage1-decode-dispatch", daemon=True)
        self._active = (stop, wake_w, thread)
        thread.start()
        complete = False
        try:
            while True:
                try:
                    item = out.get(timeout=1.0)
                except queue.Empty:
                    if not thread.is_alive():  # pragma: no cover - the thread always reports how it ended
                        raise DecodePoolError("the decode dispatcher stopped unexpectedly") from None
                    continue
                if item is None:
                    complete = True
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                released.append(item.slot)  # the caller is done with the pixels
                _wake(wake_w)
        finally:
            self._stop_dispatcher()
            os.close(wake_r)
            os.close(wake_w)
            if not complete:  # abandoned mid-run: stop workers still writing into slots a next run would use
                for w in self._workers.values():
                    if w.tasks and w.proc.is_alive():
                        w.proc.kill()  # replaced when the next run starts, if there is one

    def _stop_dispatcher(self) -> None:
        if self._active is not None:
            stop, wake_w, thread = self._active
            stop.set()
            _wake(wake_w)
            thread.join()
            self._active = None

    def _serve(self, paths, out: queue.Queue, released: collections.deque, wake_r: int, stop) -> None:
        """The dispatcher thread: opens batches as slots free up, hands tasks out, collects results."""
        bs = self.batch_size
        starts = collections.deque(range(0, len(paths), bs))
        free_slots = collections.deque(range(self.n_slots))
        ready: collections.deque[Task] = collections.deque()  # tasks not yet handed to a worker
        unfinished = 0  # batches opened and not yet complete

        def new_task(state, items, suspect=None, front=False):
            # ids never repeat, not even across runs: a progress cell must never match a task it is not on
            t = Task(self._next_task_id, state, items, suspect)
            self._next_task_id += 1
            (ready.appendleft if front else ready.append)(t)

        def finish(task: Task, results: list[tuple], seconds: float) -> None:
            nonlocal unfinished
            state = task.batch
            for (index, row, _), res in zip(task.items, results):
                state.results[index] = (row - state.first_row, res)
            state.pending -= len(results)
            state.seconds += seconds
            if state.pending == 0:
                unfinished -= 1
                out.put(self._batch(state))

        self._finish, self._new_task = finish, new_task
        try:
            while not stop.is_set():
                while released:
                    free_slots.append(released.popleft())
                while starts and free_slots and len(ready) < self.workers * DEPTH:
                    start, slot = starts.popleft(), free_slots.popleft()
                    n = min(bs, len(paths) - start)
                    state = BatchState(slot=slot, first_row=slot * bs, pending=n)
                    for lo in range(0, n, self.task_size):
                        new_task(state, [(start + k, slot * bs + k, paths[start + k])
                                         for k in range(lo, min(n, lo + self.task_size))])
                    unfinished += 1
                self._dispatch(ready)
                if unfinished == 0 and not starts:
                    out.put(None)
                    return
                self._wait(wake_r)
        except BaseException as exc:  # the caller raises it
            out.put(exc)
        finally:
            self._finish = self._new_task = None

    def _dispatch(self, ready: collections.deque) -> None:
        """Hand tasks to workers with room, the least loaded first; a lone retry goes only to an idle worker."""
        for w in sorted(self._workers.values(), key=lambda w: len(w.tasks)):
            while ready and len(w.tasks) < DEPTH:
                if ready[0].suspect is not None and w.tasks:
                    break  # alone, so that if it kills this worker nothing else is lost with it
                task = ready.popleft()
                try:
                    w.conn.send((task.task_id, task.items))
                except (BrokenPipeError, ConnectionResetError, OSError):
                    ready.appendleft(task)  # this worker is dead: _wait will notice and replace it
                    break
                if not w.tasks:
                    w.progress = (-1, time.monotonic())
                w.tasks.append(task)

    def _wait(self, wake_r: int) -> None:
        """Block until a worker reports or dies, the caller frees a slot (``wake_r``) or the watchdog's next
        check is due, and handle what happened."""
        by_conn = {w.conn: w for w in self._workers.values()}
        by_sentinel = {w.proc.sentinel: w for w in self._workers.values()}
        ready = connection.wait(list(by_conn) + list(by_sentinel) + [wake_r], timeout=1.0)
        dead = []
        for obj in ready:
            if obj == wake_r:
                os.read(wake_r, 4096)
                continue
            w = by_conn.get(obj)
            if w is not None:
                if not self._receive(w):
                    dead.append(w)
            else:
                dead.append(by_sentinel[obj])
        for w in dict.fromkeys(dead):
            if self._workers.get(w.position) is w:
                self._on_death(w)
        self._watchdog()

    def _receive(self, w: WorkerHandle) -> bool:
        """Read every finished task a worker has sent; False once its pipe is closed (it died)."""
        try:
            while w.conn.poll():
                task_id, results, seconds = w.conn.recv()
                task = w.tasks.popleft()
                assert task.task_id == task_id, "a worker answered out of order"
                self._finish(task, results, seconds)
                self._deaths_without_progress = 0
                w.progress = (-1, time.monotonic())
        except (EOFError, OSError):
            return False
        return True

    def _watchdog(self) -> None:
        now = time.monotonic()
        for w in self._workers.values():
            if not w.tasks or w.timed_out:
                continue
            cell = int(self._cells[w.position])
            if cell != w.progress[0]:
                w.progress = (cell, now)
            # on an image of its task: the per-image limit; still starting up (imports): a generous one
            on_item = cell >= 0 and cell >> _CELL_SHIFT == w.tasks[0].task_id
            if now - w.progress[1] > (self.item_timeout if on_item else max(self.item_timeout, STARTUP_TIMEOUT)):
                w.timed_out = True
                w.proc.kill()  # its sentinel fires next: _on_death records the image it was stuck on

    def _replace(self, position: int) -> None:
        w = self._workers.pop(position)
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(timeout=5)
        w.proc.close()
        self._spawn(position)

    def _on_death(self, w: WorkerHandle) -> None:
        """A worker died: account for every task it held, then replace it.

        The task it was running is split at the image in its progress cell: the images before and after go
        back to the queue, the image itself is retried alone, and recorded only if it kills a worker again.
        Which deaths blame the file: a crash (SIGSEGV, SIGABRT… or a non-zero exit) is the decoder failing
        on the file; SIGKILL (the out-of-memory killer, a user) and the watchdog are retried next run; SIGBUS
        is shared memory failing, never an image.
        """
        self._receive(w)  # results it sent before dying are valid
        w.proc.join(timeout=5)
        code = w.proc.exitcode
        cause = "timeout" if w.timed_out else death_cause(code)
        cell = int(self._cells[w.position])
        tasks = list(w.tasks)
        w.tasks.clear()
        self._replace(w.position)
        for task in reversed(tasks[1:]):  # not started: back to the front of the queue, in order
            self._new_task(task.batch, task.items, task.suspect, front=True)
        running = tasks[0] if tasks else None
        started = running is not None and cell >= 0 and cell >> _CELL_SHIFT == running.task_id
        if not started:  # it died before starting its task (at start-up, or idle): nobody to blame
            if running is not None:
                self._new_task(running.batch, running.items, running.suspect, front=True)
            self._deaths_without_progress += 1
            if self._deaths_without_progress > 3 * self.workers:
                raise DecodePoolError(f"decode workers keep dying before decoding anything ({cause}); "
                                      "run with --workers 1 to see the error")
            return
        if cause == "SIGBUS":
            self._bus_errors += 1
            if self._bus_errors > 3:
                raise DecodePoolError(
                    "decode workers keep dying of SIGBUS (a bus error), which means /dev/shm ran out of space: "
                    "free /dev/shm or make it larger (docker run --shm-size=2g, or mount -o remount,size=2G "
                    "/dev/shm), or use a smaller --batch-size")
            log.warning("a decode worker died of SIGBUS (a bus error, usually /dev/shm out of space); "
                        "retrying its images")
            self._new_task(running.batch, running.items, running.suspect, front=True)
            return
        k = cell & ((1 << _CELL_SHIFT) - 1)
        culprit = running.items[k]
        rest = running.items[:k] + running.items[k + 1:]
        if rest:
            self._new_task(running.batch, rest, front=True)
        if running.suspect is None and cause != "timeout":
            self._new_task(running.batch, [culprit], suspect=cause, front=True)
            return
        index, row, path = culprit
        reason, transient = death_reason(cause, running.suspect, self.item_timeout)
        try:  # identify the file as the next run's plan will, so that it knows this failure
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size = mtime = 0
        self._finish(Task(-1, running.batch, [culprit]), [(index, reason, transient, None, size, mtime)], 0.0)

    def _batch(self, state: BatchState) -> Batch:
        """The finished batch, its decoded rows moved together at the front of its slot."""
        slot_rows = self._rows[state.first_row:state.first_row + self.batch_size]
        items, n_ok = [], 0
        for index in sorted(state.results):
            offset, (_, reason, transient, cid, size, mtime) = state.results[index]
            if reason is None:
                if offset != n_ok:  # only after an error in the batch: close the gap it left
                    slot_rows[n_ok] = slot_rows[offset]
                items.append(ItemResult(index, n_ok, None, cid, size, mtime))
                n_ok += 1
            else:
                items.append(ItemResult(index, -1, reason, cid, size, mtime, transient))
        return Batch(slot=state.slot, pixels=slot_rows[:n_ok], items=items, decode_seconds=state.seconds)

    # ---------------------------------------------------------------------------------------------- close

    def close(self) -> None:
        self._stop_dispatcher()
        for w in self._workers.values():
            try:
                w.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for w in self._workers.values():
            w.proc.join(timeout=max(0.1, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(timeout=1)
            w.proc.close()
        self._workers.clear()
        if self._shm is not None:
            del self._rows, self._cells
            try:
                self._shm.close()
            except BufferError:  # the caller still holds a batch's pixels: the mapping goes with them
                pass
            self._shm.unlink()
            self._shm = None

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _wake(fd: int) -> None:
    """Wake the dispatcher thread (a byte on its pipe; a full pipe already wakes it)."""
    try:
        os.write(fd, b"\0")
    except (BlockingIOError, OSError):
        pass
