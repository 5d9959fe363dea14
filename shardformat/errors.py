"""The errors table beside a feature folder (``OUT.meta/errors.parquet``): every file stage 1 could not use.

Stage 1 writes it; stage 2 reads it to report why an image it was asked about has no vector. One schema and one
reader for both, documented in ``docs/shard-format.md``.
"""

from __future__ import annotations

import os

import pyarrow as pa

from shardformat.io import atomic_write_table, resolve
from shardformat.layout import errors_path, legacy_errors_path, legacy_files

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("content_id", pa.string()),
        pa.field("file_size", pa.int64()),
        pa.field("mtime_ns", pa.int64()),
        pa.field("transient", pa.bool_()),  # not the file's fault: retried next run (null in older tables)
    ]
)


def read_errors(features: str | os.PathLike) -> list[dict]:
    """The errors table of a feature folder as rows (``OUT.meta/errors.parquet``, or ``OUT/_errors.parquet`` from
    older runs); empty when there is none or it cannot be read (it is rewritten by the next stage-1 run)."""
    import pyarrow.parquet as pq

    for location in (errors_path(features), legacy_errors_path(features)):
        fs, path = resolve(location)
        try:
            with fs.open_input_file(path) as fh:
                return pq.read_table(fh).to_pylist()
        except FileNotFoundError:
            continue
        except (OSError, pa.ArrowInvalid):
            return []
    return []


def write_errors(features: str | os.PathLike, errors: list[dict]) -> None:
    """Replace the errors table of ``features`` atomically (rows sorted by path); removes an older-layout copy."""
    rows = sorted(errors, key=lambda e: e["path"])
    table = pa.Table.from_pylist([{k: e.get(k) for k in ERRORS_SCHEMA.names} for e in rows], schema=ERRORS_SCHEMA)
    fs, path = resolve(errors_path(features))
    atomic_write_table(table, fs, path)
    for location in legacy_files(features):
        legacy_fs, legacy = resolve(location)
        try:  # now in the meta folder: out of the shard folder, so that globs there see shards only
            legacy_fs.delete_file(legacy)
        except OSError:
            pass
