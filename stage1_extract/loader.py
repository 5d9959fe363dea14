"""Parallel decoding into shared-memory batches that overlap inference.

Worker processes decode whole batches straight into a fixed ring of shared-memory slots; only small
per-image records (identity, error reason) travel through queues, never pixel arrays. At most ``slots``
batches exist at once, so memory stays flat however many images there are. A worker that dies (a
decoder crashing on a hostile file) is replaced; its batch is retried one image at a time so that only
the guilty file is recorded as an error.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue
import stat
import time
from multiprocessing import shared_memory
from typing import Iterator, Sequence

import numpy as np

from stage1_extract.preprocessing import Preprocessing


@dataclasses.dataclass
class ItemResult:
    index: int  # position in the caller's list of images
    row: int  # row in the slot where its pixels are, or -1 on error
    reason: str | None
    content_id: str | None
    file_size: int
    mtime_ns: int


@dataclasses.dataclass
class Batch:
    slot: int
    pixels: np.ndarray  # view of the slot: (n_ok, S, S, 3) uint8, valid until release()
    items: list[ItemResult]
    decode_seconds: float


def _decode_one(path: str, prep: Preprocessing, draft: bool, out: np.ndarray):
    from stage1_extract.decode import DecodeError, content_id, decode_image
    from stage1_extract.dicom import split_frame_ref

    path, frame = split_frame_ref(path)  # "scan.dcm#frame=3": one frame of a multi-frame DICOM
    try:
        # O_NONBLOCK: opening a FIFO (listed in a file list, or swapped in after listing) must not wait forever
        # for a writer; it makes no difference to reading a regular file.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        reason = "permission denied" if isinstance(exc, PermissionError) else f"cannot open: {exc.strerror or exc}"
        return reason, None, 0, 0
    try:
        st = os.fstat(fd)
        size, mtime = st.st_size, st.st_mtime_ns
        if not stat.S_ISREG(st.st_mode):  # what was opened, not what the path names now
            return "not a regular file", None, size, mtime
        from stage1_extract.decode import MAX_FILE_BYTES

        if size > MAX_FILE_BYTES:
            return f"file is {size / 2**20:.0f} MiB, over the {MAX_FILE_BYTES // 2**20} MiB limit", None, size, mtime
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return f"cannot read file: {exc.strerror or exc}", None, 0, 0
    finally:
        os.close(fd)
    cid = content_id(data)
    try:
        out[...] = decode_image(data, prep, draft=draft, frame=frame)
    except DecodeError as exc:
        return str(exc), cid, size, mtime
    except Exception as exc:  # a decoder bug must cost one image, not the run
        return f"unexpected decoder error: {type(exc).__name__}: {exc}", cid, size, mtime
    return None, cid, size, mtime


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when its parent dies (e.g. ``kill -9`` of the run), so none linger."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the getppid() check in the loop covers it
        pass


def _worker(wid, shm_names, shape, prep_dict, draft, tasks, results, parent_pid):
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        return
    prep = Preprocessing.from_dict(prep_dict)
    shms = [shared_memory.SharedMemory(name=n) for n in shm_names]
    slots = [np.ndarray(shape, dtype=np.uint8, buffer=s.buf) for s in shms]
    try:
        while True:
            try:
                task = tasks.get(timeout=2.0)
            except queue.Empty:
                if os.getppid() != parent_pid:
                    break
                continue
            if task is None:
                break
            task_id, slot, items = task
            results.put(("start", wid, task_id))
            t0 = time.perf_counter()
            out, row = [], 0
            buf = slots[slot]
            for index, path in items:
                reason, cid, size, mtime = _decode_one(path, prep, draft, buf[row])
                out.append((index, row if reason is None else -1, reason, cid, size, mtime))
                if reason is None:
                    row += 1
            results.put(("done", wid, task_id, slot, row, out, time.perf_counter() - t0))
    finally:
        del slots
        for s in shms:
            s.close()


class DecodePool:
    """``for batch in pool.run(paths): ...`` yields decoded batches in completion order.

    A batch's pixels stay valid until the loop asks for the next batch; then its slot is reused.
    """

    def __init__(self, prep: Preprocessing, *, batch_size: int, workers: int, slots: int | None = None,
                 draft: bool = False) -> None:
        self.prep = prep
        self.batch_size = batch_size
        self.workers = max(1, workers)
        self.n_slots = slots or max(2, 2 * self.workers + 1)
        self.shape = (batch_size, prep.input_size, prep.input_size, 3)
        nbytes = int(np.prod(self.shape))
        self._shms = [shared_memory.SharedMemory(create=True, size=nbytes) for _ in range(self.n_slots)]
        self._views = [np.ndarray(self.shape, dtype=np.uint8, buffer=s.buf) for s in self._shms]
        self._ctx = mp.get_context("spawn")
        self._tasks = self._ctx.Queue()
        self._results = self._ctx.Queue()
        self._procs: dict[int, mp.Process] = {}
        self._next_wid = 0
        self.draft = draft
        for _ in range(self.workers):
            self._spawn()

    def _spawn(self) -> None:
        wid = self._next_wid
        self._next_wid += 1
        p = self._ctx.Process(
            target=_worker,
            args=(wid, [s.name for s in self._shms], self.shape, self.prep.to_dict(), self.draft,
                  self._tasks, self._results, os.getpid()),
            daemon=True,
            name=f"stage1-decode-{wid}",
        )
        p.start()
        self._procs[wid] = p

    def run(self, paths: Sequence[str]) -> Iterator[Batch]:
        pending: list[tuple[int, list]] = []  # tasks not yet handed to a worker (task_id, items)
        bs = self.batch_size
        for start in range(0, len(paths), bs):
            pending.append((len(pending), [(i, paths[i]) for i in range(start, min(start + bs, len(paths)))]))
        pending.reverse()
        next_id = len(pending)
        free = list(range(self.n_slots))
        inflight: dict[int, tuple[int, list]] = {}  # task_id -> (slot, items)
        running: dict[int, int] = {}  # wid -> task_id

        def submit():
            while free and pending:
                task_id, items = pending.pop()
                slot = free.pop()
                inflight[task_id] = (slot, items)
                self._tasks.put((task_id, slot, items))

        submit()
        while inflight:
            try:
                msg = self._results.get(timeout=0.5)
            except queue.Empty:
                for wid, proc in list(self._procs.items()):
                    if proc.is_alive():
                        continue
                    del self._procs[wid]
                    self._spawn()
                    task_id = running.pop(wid, None)
                    if task_id is None or task_id not in inflight:
                        continue
                    slot, items = inflight.pop(task_id)
                    free.append(slot)
                    if len(items) == 1:  # the culprit: record it and move on
                        index, _ = items[0]
                        yield Batch(slot=-1, pixels=self._views[slot][:0], decode_seconds=0.0, items=[
                            ItemResult(index, -1, "decoder process crashed on this file", None, 0, 0)])
                    else:  # retry one image per task to find which file killed the worker
                        for item in reversed(items):
                            pending.append((next_id, [item]))
                            next_id += 1
                    submit()
                continue
            if msg[0] == "start":
                running[msg[1]] = msg[2]
                continue
            _, wid, task_id, slot, n_ok, out, seconds = msg
            running.pop(wid, None)
            if task_id not in inflight:
                continue
            del inflight[task_id]
            items = [ItemResult(*o) for o in out]
            yield Batch(slot=slot, pixels=self._views[slot][:n_ok], items=items, decode_seconds=seconds)
            free.append(slot)  # the consumer is done with the pixels once it asks for the next batch
            submit()

    def close(self) -> None:
        for _ in self._procs:
            try:
                self._tasks.put(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 5
        for p in self._procs.values():
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=1)
        self._procs.clear()
        for q in (self._tasks, self._results):
            q.cancel_join_thread()
            q.close()
        self._views.clear()
        for s in self._shms:
            try:
                s.close()
                s.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
