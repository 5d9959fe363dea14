"""SIGTERM stops a run the way Ctrl-C does: finished shards kept, what was saved said, lock released.

``kill``, ``docker stop``, systemd and batch schedulers (Slurm at the time limit) send SIGTERM, whose
default action ends the process on the spot: no message, the decode pool's shared memory left for the
resource tracker to reclaim (with "leaked shared_memory" warnings). Inside :func:`sigterm_as_interrupt`
SIGTERM raises :class:`Terminated`, a ``KeyboardInterrupt``, so the code that already handles Ctrl-C
(finally blocks, context managers, the CLI's message) handles it too.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (handled like Ctrl-C)."""

    signal_name = "SIGTERM"
    exit_code = 128 + signal.SIGTERM


def _raise_terminated(signum, frame):
    # Once is enough: a second SIGTERM during the cleanup must not interrupt the cleanup itself.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated("stopped by SIGTERM")


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises :class:`Terminated`. Only in the main thread, and only when nobody
    else has claimed SIGTERM (an application's own handler is left alone); the old handler comes back after."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
            signal.SIG_DFL, None):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
