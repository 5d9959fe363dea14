"""A training run directory, written atomically: built under a temporary name, then renamed into place.

A training run killed at any moment leaves at most a ``.tmp-*`` folder, never a run directory that
``predict`` would load; ``run.json`` (written last inside) marks a complete run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

MARKER = "run.json"
FILES = ("model.keras", "labels.json", "shard_metadata.json", "config.json", "metrics.json", MARKER)


class RunDirError(FileNotFoundError):
    """Not a complete stage-2 run directory."""


class RunWriter:
    def __init__(self, final: str | os.PathLike) -> None:
        self.final = Path(final).expanduser().absolute()
        self.final.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.final.parent.glob(f".tmp-{self.final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed run
        self.tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.final.name}-", dir=self.final.parent))

    def path(self, name: str) -> str:
        return str(self.tmp / name)

    def write_json(self, name: str, payload) -> None:
        (self.tmp / name).write_text(json.dumps(payload, indent=1, default=float))

    def commit(self, marker: dict) -> Path:
        self.write_json(MARKER, marker)
        for f in self.tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        trash = None
        if self.final.exists():
            trash = self.final.with_name(f".tmp-{self.final.name}-old-{os.getpid()}")
            os.replace(self.final, trash)
        os.replace(self.tmp, self.final)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def check_run(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise RunDirError(f"{path}: no such run directory (train one with stage2-classify train --out {path})")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise RunDirError(f"{path}: not a complete training run (missing {', '.join(missing)}); train it again")
    return path
