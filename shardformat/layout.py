"""Where the files of a shard folder live.

``OUT/`` holds the feature shards and nothing else, so every everyday reader (``pl.read_parquet(OUT)``,
``duckdb … read_parquet('OUT/*.parquet')``, ``pq.read_table(OUT)``) sees exactly the feature rows.
The run's bookkeeping (errors table, run summary, lock) lives in the sibling folder ``OUT.meta/``.
"""

from __future__ import annotations

import hashlib
import os

from shardformat.schema import ERRORS_FILE, LEGACY_ERRORS_FILE, META_SUFFIX, SHARD_PREFIX


def _base(directory: str | os.PathLike) -> tuple[str, str]:
    """(``directory`` without a trailing slash, its ``?query`` part) for a path or URI. A local path reached
    through a symbolic link is its real path: ``features`` and ``link-to-features`` share one ``.meta`` folder."""
    text = os.fspath(directory)
    base, sep, query = text.partition("?") if "://" in text else (text, "", "")
    stripped = base.rstrip("/") or base
    if not sep and "://" not in text:
        real = os.path.realpath(stripped)
        if real != os.path.abspath(stripped):
            stripped = real
    return stripped, sep + query


def meta_dir(directory: str | os.PathLike) -> str:
    """The folder beside ``directory`` that holds its errors table, run summary and lock: ``<directory>.meta``."""
    base, query = _base(directory)
    return f"{base}{META_SUFFIX}{query}"


def meta_file(directory: str | os.PathLike, name: str) -> str:
    """Path (or URI) of ``name`` in the meta folder of ``directory``."""
    base, query = _base(directory)
    return f"{base}{META_SUFFIX}/{name}{query}"


def errors_path(directory: str | os.PathLike) -> str:
    """Where the errors table of ``directory`` is written: ``<directory>.meta/errors.parquet``."""
    return meta_file(directory, ERRORS_FILE)


def legacy_errors_path(directory: str | os.PathLike) -> str:
    """Where older versions wrote it (``<directory>/_errors.parquet``); read when the new one is absent."""
    base, query = _base(directory)
    return f"{base}/{LEGACY_ERRORS_FILE}{query}"


def legacy_files(directory: str | os.PathLike) -> list[str]:
    """Bookkeeping files older versions kept among the shards (errors table, run summary): a run moves them out."""
    base, query = _base(directory)
    return [f"{base}/{name}{query}" for name in (LEGACY_ERRORS_FILE, "_run.json")]


def read_run_summary(directory: str | os.PathLike) -> dict:
    """The last stage-1 run's summary of ``directory`` (``OUT.meta/run.json``, else an older ``OUT/_run.json``);
    ``{}`` when there is none or it cannot be read (e.g. ``images_root`` for the reports' thumbnails)."""
    import json

    from shardformat.io import resolve

    base, query = _base(directory)
    for location in (meta_file(directory, "run.json"), f"{base}/_run.json{query}"):
        try:
            fs, path = resolve(location)
            with fs.open_input_stream(path) as fh:
                payload = json.loads(fh.read().decode())
        except (OSError, ValueError):
            continue
        if isinstance(payload, dict):
            return payload
    return {}


def _first_existing(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def require_folder(path: str | os.PathLike, option: str = "--out") -> None:
    """Refuse, with one clear message, a local output folder that is a file or lies below a file.

    Without this a user sees ``[Errno 17] File exists`` or ``[Errno 20] Not a directory``. URIs pass.
    """
    text = os.fspath(path)
    if "://" in text:
        return
    full = os.path.abspath(os.path.expanduser(text))
    existing = _first_existing(full)
    if not os.path.isdir(existing):
        where = "is a file" if existing == full else f"is inside {existing}, which is a file"
        raise NotADirectoryError(f"{option} {text}: {where}, not a folder; choose another {option}")


def require_file_target(path: str | os.PathLike, option: str = "--out") -> None:
    """Refuse, with one clear message, an output file name that is a folder or lies below a file."""
    text = os.fspath(path)
    if "://" in text:
        return
    full = os.path.abspath(os.path.expanduser(text))
    if text.endswith(("/", os.sep)) or os.path.isdir(full):
        example = os.path.join(text, "predictions.csv")
        raise IsADirectoryError(f"{option} {text}: names a folder; give a file name, e.g. {example}")
    existing = _first_existing(os.path.dirname(full))
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"{option} {text}: {existing} is a file, not a folder; choose another {option}")


def shard_name(stamp: str, *, seq: int | None = None, paths: list[str] | None = None) -> str:
    """``part-<run stamp>-<suffix>.parquet``: the stamp sorts runs in order. The suffix is a sequence number
    for a single writer, or a hash of the rows' paths where tasks may be retried (same rows → same name,
    so a retried write replaces its own shard instead of adding a copy)."""
    if (seq is None) == (paths is None):
        raise ValueError("give exactly one of seq and paths")
    if seq is not None:
        return f"{SHARD_PREFIX}{stamp}-{seq:05d}.parquet"
    digest = hashlib.blake2b("\0".join(paths).encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()
    return f"{SHARD_PREFIX}{stamp}-{digest}.parquet"
