"""The decode pool's bookkeeping: the tasks it hands out, the batches they fill, the workers that hold them,
and what a worker's death says about the image it was decoding.

Kept apart from :mod:`stage1_extract.decoding.pool` (the dispatcher itself) so that the rules for blaming a
file — the part a reader of an errors table wants to check — can be read on their own.
"""

from __future__ import annotations

import collections
import dataclasses
import signal
import time

# Deaths that say nothing about the image (the OOM killer or a user, the watchdog, an unknown end): retried
# next run. Any other death while decoding one image twice (SIGSEGV, SIGABRT, an exit) is the file's fault.
NOT_THE_FILE = {"SIGKILL", "SIGTERM", "SIGINT", "timeout", "unknown"}


@dataclasses.dataclass
class Task:
    task_id: int
    batch: "BatchState"
    items: list[tuple[int, int, str]]  # (index, row in the whole block, path)
    suspect: str | None = None  # set on a lone retry of the image a worker died on: how it died then


@dataclasses.dataclass
class BatchState:
    slot: int
    first_row: int
    pending: int
    results: dict[int, tuple] = dataclasses.field(default_factory=dict)  # index -> (offset, result tuple)
    seconds: float = 0.0


class WorkerHandle:
    """The parent's view of one decode worker: its process, its pipe, the tasks it holds, its progress."""

    def __init__(self, proc, conn, position: int) -> None:
        self.proc, self.conn, self.position = proc, conn, position
        self.tasks: collections.deque[Task] = collections.deque()  # handed out, in the order it runs them
        self.progress: tuple[int, float] = (-1, time.monotonic())  # (cell value, when it was first seen)
        self.timed_out = False


def death_cause(exitcode: int | None) -> str:
    """How a worker ended, from its exit code: a signal's name, ``exit code N``, or ``unknown``."""
    if exitcode is None:
        return "unknown"
    if exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def death_reason(cause: str, suspect: str | None, item_timeout: float) -> tuple[str, bool]:
    """(reason, transient) recorded for the image a worker died on twice (or was stopped on by the watchdog)."""
    if cause == "timeout":
        return (f"decoding took over {item_timeout:.0f} s; the worker was stopped "
                "(transient: retried next run)"), True
    if cause in NOT_THE_FILE or suspect in NOT_THE_FILE:
        killed = cause if cause in NOT_THE_FILE else suspect
        return (f"decode worker was killed ({killed}) while decoding this file, e.g. by the "
                "out-of-memory killer (transient: retried next run)"), True
    return f"decoder process crashed on this file ({cause})", False
