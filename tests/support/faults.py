"""Fault injection for the tests: make reading a chosen file crash, hang or fail, deterministically.

The fault tests need a decoder that segfaults on chosen files, a worker that blocks on a chosen file until
killed, an out-of-memory or EIO error on a chosen file… at a chosen point rather than by racing the clock.

How it reaches the decode workers: stage 1 calls the function that ``STAGE1_READ_HOOK`` names with each path
before opening it (:mod:`stage1_extract.decoding.files`, looked up once per process). :func:`fault_env` gives
the environment that installs :func:`inject` as that hook; decode workers, Ray workers and CLI subprocesses
started afterwards inherit it (they import this module from the repository root, which is on their path).
``STAGE1_FAULTS`` lists ``ACTION:FILENAME`` pairs separated by ``;``, matched on the file's base name:

- ``segv``, ``bus``, ``kill``: the process dies of SIGSEGV (a real invalid read), SIGBUS or SIGKILL;
- ``hang``: sleeps forever (for the watchdog);
- ``block``: the first time only (across processes), writes its pid to ``STAGE1_FAULTS_DIR/<name>.blocked``
  and sleeps until killed; the test waits for that file and then kills the worker;
- ``eio``, ``oom``: raises ``OSError(EIO)`` or ``MemoryError`` (transient failures);
- ``sleepN``: sleeps N milliseconds (``bench/decode_pool.py``: a decoder of fixed cost, whatever the load).

The name ``*`` matches every file.
"""

from __future__ import annotations

import errno
import os
import signal
import time

#: the value of STAGE1_READ_HOOK that installs :func:`inject`
HOOK = "tests.support.faults:inject"
_PLAN: tuple[str, dict[str, str]] = ("", {})


def fault_env(plan: str, marker_dir=None) -> dict[str, str]:
    """The environment variables for the fault ``plan`` (``"segv:a.jpg;eio:b.jpg"``); ``block`` markers go to
    ``marker_dir``."""
    env = {"STAGE1_READ_HOOK": HOOK, "STAGE1_FAULTS": plan}
    if marker_dir is not None:
        env["STAGE1_FAULTS_DIR"] = str(marker_dir)
    return env


def _plan() -> dict[str, str]:
    global _PLAN
    spec = os.environ.get("STAGE1_FAULTS", "")
    if spec != _PLAN[0]:
        pairs = (item.split(":", 1) for item in spec.split(";") if ":" in item)
        _PLAN = (spec, {name: action for action, name in pairs})
    return _PLAN[1]


def inject(path: str) -> None:
    """Carry out the fault planned for ``path``, if any."""
    plan = _plan()
    if not plan:
        return
    action = plan.get(os.path.basename(path)) or plan.get("*")
    if action is None:
        return
    if action.startswith("sleep"):
        time.sleep(int(action[5:]) / 1000)
        return
    if action == "segv":
        import ctypes

        ctypes.string_at(0)  # a real invalid read, as a buggy C decoder would do
    elif action in ("bus", "kill"):
        os.kill(os.getpid(), signal.SIGBUS if action == "bus" else signal.SIGKILL)
        time.sleep(60)
    elif action == "hang":
        while True:
            time.sleep(3600)
    elif action == "block":
        marker = os.path.join(os.environ.get("STAGE1_FAULTS_DIR", "."), os.path.basename(path) + ".blocked")
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return  # blocked once already: this time the file decodes normally
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        while True:
            time.sleep(3600)
    elif action == "eio":
        raise OSError(errno.EIO, os.strerror(errno.EIO), path)
    elif action == "oom":
        raise MemoryError
