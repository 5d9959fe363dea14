"""Peak memory of a command and all its descendants (decode workers included), sampled from /proc.

Three figures, because no single one tells the whole story for a process tree sharing memory:

* ``peak_pss_mib``: the peak over time of the summed PSS (proportional set size) of the tree. Shared pages
  (the shared-memory batch slots, shared libraries) are split between the processes that map them, so
  this is the tree's real footprint. Read from ``/proc/PID/smaps_rollup``.
* ``peak_rss_sum_mib``: the peak of the summed RSS; counts shared pages once per process, so it overstates.
* ``max_process_rss_mib``: the kernel's own high-water mark (``ru_maxrss`` from ``wait4``) of the largest
  single process in the tree; exact, never missed by sampling, but one process only.

Sampling every ``interval`` seconds can miss a spike shorter than that; the kernel figure cannot.
Linux only.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
import threading
import time
from typing import Sequence


@dataclasses.dataclass
class MeasuredRun:
    returncode: int
    stdout: str
    stderr: str
    wall_seconds: float
    peak_pss_mib: float
    peak_rss_sum_mib: float
    max_process_rss_mib: float
    peak_processes: int
    samples: int

    def memory(self) -> dict:
        return {"peak_pss_mib": round(self.peak_pss_mib, 1), "peak_rss_sum_mib": round(self.peak_rss_sum_mib, 1),
                "max_process_rss_mib": round(self.max_process_rss_mib, 1), "peak_processes": self.peak_processes,
                "samples": self.samples}


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # comm may hold spaces and parentheses: the fields after the last ')' are fixed
        fields = stat[stat.rfind(b")") + 2:].split()
        kids.setdefault(int(fields[1]), []).append(int(name))
    return kids


def tree(root: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def _pss_rss_kib(pid: int) -> tuple[int, int]:
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
        return pss, rss
    except FileNotFoundError:
        return 0, 0
    except OSError:  # no smaps_rollup (old kernel): RSS for both
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1])
        except OSError:
            pass
        return rss, rss


def run_measured(cmd: Sequence[str], *, env: dict | None = None, interval: float = 0.1,
                 cwd: str | None = None) -> MeasuredRun:
    """Run ``cmd`` to completion, sampling the memory of its process tree every ``interval`` seconds."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, env=env, cwd=cwd)
        peak = {"pss": 0, "rss": 0, "n": 0, "samples": 0}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                pss = rss = 0
                pids = tree(proc.pid)
                for pid in pids:
                    p, r = _pss_rss_kib(pid)
                    pss += p
                    rss += r
                peak["pss"] = max(peak["pss"], pss)
                peak["rss"] = max(peak["rss"], rss)
                peak["n"] = max(peak["n"], len(pids))
                peak["samples"] += 1
                done.wait(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            # wait4, not wait: its rusage carries the tree's largest ru_maxrss (child and reaped grandchildren)
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            raise
        finally:
            done.set()
            sampler.join()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return MeasuredRun(
            returncode=proc.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            wall_seconds=wall,
            peak_pss_mib=peak["pss"] / 1024,
            peak_rss_sum_mib=peak["rss"] / 1024,
            max_process_rss_mib=usage.ru_maxrss / 1024,
            peak_processes=peak["n"],
            samples=peak["samples"],
        )
