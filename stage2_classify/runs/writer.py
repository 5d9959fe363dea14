"""A training run directory, written atomically: built under a temporary name, then renamed into place.

A training run killed at any moment leaves at most a ``.tmp-*`` folder next to the run directory, never a
run directory that ``predict`` would load. ``run.json``, written last inside the temporary folder, marks a
complete run; :func:`stage2_classify.runs.load.check_run` refuses a directory without it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from shardformat.io import fsync_dir
from stage2_classify.errors import RunDirError
from stage2_classify.runs.layout import KNOWN, MARKER


def _fsync_dir(path: Path) -> None:
    fsync_dir(str(path))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunWriter:
    """Collects a run's files in ``.tmp-<name>-<pid>-*`` and renames the folder to ``final`` on commit."""

    def __init__(self, final: str | os.PathLike) -> None:
        self.final = Path(final).expanduser().absolute()
        if self.final.exists():
            check_replaceable(self.final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        pattern = re.compile(rf"\.tmp-{re.escape(self.final.name)}-(\d+)-(?:old-)?[a-z0-9_]+")
        for stale in self.final.parent.glob(f".tmp-{self.final.name}-*"):
            match = pattern.fullmatch(stale.name)
            if match and not _pid_alive(int(match.group(1))):  # left by a killed run
                shutil.rmtree(stale, ignore_errors=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.final.name}-{os.getpid()}-", dir=self.final.parent))

    def path(self, name: str) -> str:
        return str(self.tmp / name)

    def write_text(self, name: str, text: str) -> None:
        try:
            (self.tmp / name).write_text(text)
        except OSError as exc:  # a full disk: say which file of which run, not a bare "[Errno 28]"
            if exc.filename is None:
                exc.filename = str(self.final / name)
            raise

    def write_json(self, name: str, payload) -> None:
        self.write_text(name, json.dumps(payload, indent=1, default=_json_default))

    def commit(self, marker: dict) -> Path:
        """Write the completion marker, flush everything, and move the folder into place (replacing a run)."""
        self.write_json(MARKER, marker)
        for f in self.tmp.iterdir():
            with open(f, "rb") as fh:
                try:
                    os.fsync(fh.fileno())
                except OSError as exc:  # a full disk: name the file, not a bare "[Errno 28]"
                    exc.filename = exc.filename or str(self.final / f.name)
                    raise
        _fsync_dir(self.tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp made it 0700; a run dir is an ordinary folder
        if self.final.exists():
            check_replaceable(self.final)
            if _exchange(self.tmp, self.final):  # one atomic step: the old run until then, the new one after
                _fsync_dir(self.final.parent)
                shutil.rmtree(self.tmp, ignore_errors=True)  # now holds the old run
                return self.final
            trash = Path(tempfile.mkdtemp(prefix=f".tmp-{self.final.name}-{os.getpid()}-old-",
                                          dir=self.final.parent))
            os.replace(self.final, trash / "run")  # no atomic exchange here: a brief moment without a run
            os.replace(self.tmp, self.final)
            _fsync_dir(self.final.parent)
            shutil.rmtree(trash, ignore_errors=True)
            return self.final
        os.replace(self.tmp, self.final)
        _fsync_dir(self.final.parent)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # filesystem or kernel cannot
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def _json_default(value):
    import numpy as np

    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def check_replaceable(path: Path) -> None:
    """Training may replace an earlier run directory or an empty folder, never a folder of other files."""
    if not path.is_dir():
        raise RunDirError(f"{path} exists and is not a directory; choose another --out")
    foreign = [p.name for p in path.iterdir() if p.name not in KNOWN]
    if foreign:
        raise RunDirError(
            f"{path} exists and holds files that are not a stage-2 run ({', '.join(sorted(foreign)[:3])}"
            f"{', …' if len(foreign) > 3 else ''}); choose another --out or remove it"
        )


