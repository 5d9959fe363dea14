"""Shard and errors-table writing for stage 1, overlapped with inference in a background thread.

Rows accumulate until a shard holds ``shard_size`` rows (or ``max_seconds``, a minute, have passed, so a
crash or ``kill -9`` loses at most about a minute of work); the shard is then written atomically by a writer
thread while inference goes on.
"""

from __future__ import annotations

import datetime as dt
import queue
import secrets
import threading
import time

import numpy as np

from shardformat import ShardMetadata, atomic_write_json, shard_name, write_shard
from shardformat.layout import meta_file
from stage1_extract.errors import Stage1Error

def run_stamp() -> str:
    """Sortable, unique per run: shard names sort in write order across runs."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


class ShardWriter:
    def __init__(self, out: str, meta: ShardMetadata, *, shard_size: int = 2048, max_seconds: float = 60.0,
                 stamp: str | None = None) -> None:
        self.out = out
        self.meta = meta
        self.shard_size = shard_size
        self.max_seconds = max_seconds
        self.stamp = stamp or run_stamp()
        self._seq = 0
        self._rows: dict[str, list] = {k: [] for k in ("paths", "labels", "content_ids", "file_sizes", "mtimes_ns",
                                                       "groups")}
        self._features: list[np.ndarray] = []
        self._n = 0
        self._first_row_at: float | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self.written_rows = 0
        self.shards: list[str] = []
        self.write_seconds = 0.0
        self._thread = threading.Thread(target=self._loop, name="shard-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is not None:
                continue
            name, rows, feats = job
            t0 = time.perf_counter()
            try:
                path = write_shard(self.out, name, self.meta, features=feats, **rows)
            except BaseException as exc:  # surfaced in the main thread at the next add()/close()
                self._error = exc
                continue
            self.write_seconds += time.perf_counter() - t0
            self.written_rows += len(rows["paths"])
            self.shards.append(path)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            raise ShardWriteError(getattr(exc, "errno", None), f"writing a shard in {self.out} failed: {exc}") from exc

    def add(self, paths, labels, content_ids, file_sizes, mtimes_ns, features: np.ndarray, groups=None) -> None:
        self._raise_if_failed()
        if self._first_row_at is None:
            self._first_row_at = time.monotonic()
        groups = [None] * len(paths) if groups is None else groups
        for key, values in zip(self._rows, (paths, labels, content_ids, file_sizes, mtimes_ns, groups)):
            self._rows[key].extend(values)
        self._features.append(np.asarray(features, dtype=np.float32))
        self._n += len(paths)
        if self._n >= self.shard_size or time.monotonic() - self._first_row_at >= self.max_seconds:
            self.flush()

    def flush(self) -> None:
        if self._n == 0:
            return

        feats = np.concatenate(self._features) if len(self._features) > 1 else self._features[0]
        name = shard_name(self.stamp, seq=self._seq)
        self._seq += 1
        self._queue.put((name, self._rows, feats))
        self._rows = {k: [] for k in self._rows}
        self._features, self._n, self._first_row_at = [], 0, None

    def close(self) -> None:
        """Write what is buffered, wait for the writer thread, and raise if any write failed."""
        try:
            self.flush()
        finally:
            self._queue.put(None)
            self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop without writing buffered rows (after an error elsewhere); finished shards stay."""
        self._queue.put(None)
        self._thread.join(timeout=60)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during extraction, after the rows already computed were written: says how many are safe."""

    def __init__(self, out: str, saved: int, before: int, by: BaseException | None = None) -> None:
        super().__init__(f"{saved} image(s) extracted by this run are saved in {out} ({before} were done before); "
                         "rerun the same command to resume")
        self.saved, self.before = saved, before
        # Ctrl-C, or SIGTERM (stage1_extract.run.signals.Terminated): the CLI names it and exits with its code
        self.signal_name = getattr(by, "signal_name", "Ctrl-C")
        self.exit_code = getattr(by, "exit_code", 130)


class ShardWriteError(Stage1Error, OSError):
    """A shard could not be written (disk full, permissions…); finished shards are intact."""


def write_json(out: str, name: str, payload: dict) -> None:
    """Write ``name`` as JSON into the meta folder beside ``out`` (``OUT.meta/``), atomically."""
    atomic_write_json(meta_file(out, name), payload)
