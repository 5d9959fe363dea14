"""Where the files of a shard folder live.

``OUT/`` holds the feature shards and nothing else, so every everyday reader (``pl.read_parquet(OUT)``,
``duckdb … read_parquet('OUT/*.parquet')``, ``pq.read_table(OUT)``) sees exactly the feature rows.
The run's bookkeeping (errors table, run summary, lock) lives in the sibling folder ``OUT.meta/``.
"""

from __future__ import annotations

import os

from shardformat.schema import ERRORS_FILE, LEGACY_ERRORS_FILE, META_SUFFIX


def _base(directory: str | os.PathLike) -> tuple[str, str]:
    """(``directory`` without a trailing slash, its ``?query`` part) for a path or URI."""
    text = os.fspath(directory)
    base, sep, query = text.partition("?") if "://" in text else (text, "", "")
    stripped = base.rstrip("/") or base
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
