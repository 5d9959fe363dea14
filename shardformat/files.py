"""Atomic writes and defensive reads for the small files the project leaves beside shards and runs.

One writer for every file: the bytes go to a hidden temporary name in the same folder, are flushed to
disk, renamed over the target and the folder entry is flushed, so a crash, a ``kill -9`` or a full disk
leaves either the old file or the new one, never an empty or half-written one, and no temporary file.
An ``OSError`` without a file name (``[Errno 28] No space left on device``) gets the target's name.

Paths may be local or URIs that pyarrow speaks (``s3://``, ``gs://``…); an object store PUT is already
all-or-nothing, so no temporary name is used there.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, BinaryIO, Callable

from shardformat import io as _io  # looked up at call time: tests swap in other filesystems
from shardformat.layout import require_file_target

TMP_PREFIX = ".tmp-"
_MISSING = object()


def _name_the_file(exc: BaseException, path: str) -> None:
    if isinstance(exc, OSError) and exc.filename is None:
        exc.filename = path


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> str:
    """Call ``write(fh)`` on a temporary binary file and move it to ``path`` only once it is complete
    (:func:`shardformat.io.atomic_write_fs`, the writer of shards too). Returns ``path`` as a string;
    missing parent folders are created."""
    target = os.fspath(path)
    fs, full = _io.resolve(target)
    _io.atomic_write_fs(fs, full, write)
    return target


def atomic_write_via_path(path: str | os.PathLike, write: Callable[[str], Any]) -> str:
    """Like :func:`atomic_write` for libraries that want a file name rather than a file object
    (``pyarrow.csv.write_csv``, ``Figure.savefig``…): ``write(tmp_path)`` fills a local temporary file."""
    require_file_target(path)
    full = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(full)
    os.makedirs(parent, exist_ok=True)
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{stem}{ext}")  # keep the suffix: savefig reads it
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, full)
    except BaseException as exc:
        _remove_quietly(tmp)
        _name_the_file(exc, full)
        raise
    _io.fsync_dir(parent)
    return os.fspath(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, payload: Any, *, indent: int | None = 1,
                      default: Callable[[Any], Any] | None = str) -> str:
    """Write ``payload`` as JSON to ``path`` atomically (``default`` turns unknown objects into JSON)."""
    return atomic_write_text(path, json.dumps(payload, indent=indent, default=default) + "\n")


def read_json(path: str | os.PathLike, default: Any = _MISSING) -> Any:
    """The JSON in ``path``. With ``default``, a missing, empty, unreadable or corrupt file gives ``default``
    (for caches and hints that are rebuilt anyway); without it, such a file raises ``ValueError`` naming it."""
    target = os.fspath(path)
    try:
        fs, full = _io.resolve(target)
        if _io._is_local(fs):
            with open(full, "rb") as fh:
                data = fh.read()
        else:
            with fs.open_input_stream(full) as fh:
                data = fh.read()
        return json.loads(data)
    except (OSError, ValueError) as exc:
        if default is not _MISSING:
            return default
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{target}: not a readable JSON file ({exc}); delete it or write it again") from None
