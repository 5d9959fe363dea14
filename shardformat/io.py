"""Reading and writing feature shards, on local disk or any filesystem pyarrow speaks.

Writes are atomic: a shard is written under a hidden temporary name, flushed to disk and then
renamed, so a reader (or a rerun after ``kill -9``) sees either the whole shard or nothing.
Reads turn the ``feature`` column into one contiguous float32 matrix without per-row Python.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from shardformat.schema import (
    INDEX_COLUMNS,
    METADATA_KEY,
    OPTIONAL_COLUMNS,
    SHARD_PREFIX,
    IncompatibleShardsError,
    ShardFormatError,
    ShardMetadata,
    shard_schema,
)

TMP_PREFIX = ".tmp-"


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Map a local path or a URI (``file://``, ``s3://``, ``gs://``, ``hdfs://``) to (filesystem, path)."""
    text = os.fspath(location)
    if "://" in text:
        fs, path = pafs.FileSystem.from_uri(text)
        return fs, path.rstrip("/") or "/"
    return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())


def _is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def fsync_dir(path: str) -> None:
    """Flush a folder's entry table so a rename inside it survives a power cut; best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary_name(parent: str, name: str) -> str:
    """Hidden, and not ending in ``.parquet``: a write in flight (or left by ``kill -9``) never matches a
    reader's ``OUT/*.parquet`` glob."""
    return f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex}-{name}.partial"


def _parquet_options(table: pa.Table, compression: str) -> dict:
    """Feature vectors are stored plain (no compression, no dictionary): decoding zstd halves the speed at
    which stage 2 loads them, and dense floats gain little from either. Other columns use ``compression``."""
    if "feature" not in table.column_names:
        return {"compression": compression, "write_page_checksum": True}
    return {
        "compression": {name: ("none" if name == "feature" else compression) for name in table.column_names},
        "use_dictionary": [name for name in table.column_names if name != "feature"],
        "write_page_checksum": True,  # a CRC per page, verified on read: a bit flip is found, not trained on
    }


def atomic_write_fs(fs: pafs.FileSystem, path: str, write) -> None:
    """Call ``write(file_object)`` so that ``path`` on ``fs`` is either absent (or as before) or complete.

    On a local disk: temporary name in the same folder, fsync, rename, fsync of the folder. On object stores a
    single PUT is already all-or-nothing, so the temporary name is skipped there; other remote filesystems
    write a temporary file and move it. A failure (disk full, permission) removes the temporary file and
    re-raises, naming ``path`` when the error names no file ("[Errno 28] No space left on device: '…'").
    """
    parent, name = path.rsplit("/", 1)
    if _is_local(fs):
        os.makedirs(parent, exist_ok=True)
        tmp = _temporary_name(parent, name)
        try:
            with open(tmp, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(exc, OSError) and exc.filename is None:
                exc.filename = path
            raise
        fsync_dir(parent)
        return
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, (pafs.S3FileSystem, pafs.GcsFileSystem)):
        with fs.open_output_stream(path) as out:
            write(out)
        return
    tmp = _temporary_name(parent, name)
    try:
        with fs.open_output_stream(tmp) as out:
            write(out)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except Exception:
            pass
        raise


def atomic_write_table(table: pa.Table, fs: pafs.FileSystem, path: str, *, compression: str = "zstd") -> None:
    """Write ``table`` as Parquet to ``path`` so that ``path`` is either absent or complete (:func:`atomic_write_fs`)."""
    atomic_write_fs(fs, path, lambda fh: pq.write_table(table, fh, **_parquet_options(table, compression)))


def write_shard(
    directory: str | os.PathLike,
    name: str,
    meta: ShardMetadata,
    *,
    paths: Sequence[str],
    labels: Sequence[str | None],
    content_ids: Sequence[str],
    file_sizes: Sequence[int],
    mtimes_ns: Sequence[int],
    features: np.ndarray,
    groups: Sequence[str | None] | None = None,
) -> str:
    """Atomically write one shard ``directory/name`` and return its full path.

    ``groups`` (optional, e.g. a patient id per image) keeps related images together when stage 2 splits
    the data; None writes a null group for every row.
    """
    if not name.startswith(SHARD_PREFIX) or not name.endswith(".parquet"):
        raise ValueError(f"shard names must look like '{SHARD_PREFIX}*.parquet', got {name!r}")
    features = np.ascontiguousarray(features, dtype=np.float16 if meta.feature_dtype == "float16" else np.float32)
    n = len(paths)
    if features.shape != (n, meta.feature_dim):
        raise ValueError(f"features have shape {features.shape}, expected ({n}, {meta.feature_dim})")
    groups = [None] * n if groups is None else [None if g is None or g == "" else str(g) for g in groups]
    if len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} rows")
    schema = shard_schema(meta)
    feature_type = schema.field("feature").type
    flat = pa.array(features.reshape(-1), type=feature_type.value_type)
    table = pa.table(
        [
            pa.array(list(paths), pa.string()),
            pa.array(list(labels), pa.string()),
            pa.array(list(content_ids), pa.string()),
            pa.array(np.asarray(file_sizes, dtype=np.int64)),
            pa.array(np.asarray(mtimes_ns, dtype=np.int64)),
            pa.array(groups, pa.string()),
            pa.FixedSizeListArray.from_arrays(flat, type=feature_type),
        ],
        schema=schema,
    )
    fs, root = resolve(directory)
    full = f"{root}/{name}"
    atomic_write_table(table, fs, full)
    return full


def list_shards(directory: str | os.PathLike) -> list[str]:
    """Full paths of the finished shards in ``directory``, sorted by name (= by write order)."""
    fs, root = resolve(directory)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type != pafs.FileType.Directory:
        raise ShardFormatError(f"{directory} is not a directory of shards")
    selector = pafs.FileSelector(root, recursive=False)
    names = [
        i.path
        for i in fs.get_file_info(selector)
        if i.type == pafs.FileType.File
        and i.base_name.startswith(SHARD_PREFIX)
        and i.base_name.endswith(".parquet")
    ]
    return sorted(names)


def damaged_shard_message(path: str, exc: BaseException) -> str:
    """What to say about a shard that cannot be read back as it was written, and what to do about it."""
    return (f"{path}: the shard is damaged ({exc}); rerun stage1-extract with the same --images and --out "
            "to extract its images again (if that run cannot read it either, delete the shard first)")


def _open(fs: pafs.FileSystem, path: str) -> pq.ParquetFile:
    """A shard opened for reading with its pages' checksums verified (shards written before checksums have
    none, and read as before)."""
    try:
        return pq.ParquetFile(fs.open_input_file(path), page_checksum_verification=True)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ShardFormatError(f"{path}: not a readable Parquet shard ({exc}); if stage1-extract wrote it, "
                               "delete it and rerun stage1-extract with the same --images and --out") from None


def _read(pf: pq.ParquetFile, path: str, **kwargs) -> pa.Table:
    try:
        return pf.read(**kwargs)
    except (pa.ArrowInvalid, OSError) as exc:  # a CRC mismatch, or damage to a page's own header
        raise ShardFormatError(damaged_shard_message(path, exc)) from None


def _meta_of(schema: pa.Schema, where: str) -> ShardMetadata:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ShardFormatError(
            f"{where}: no '{METADATA_KEY.decode()}' schema metadata: this Parquet file was not written by stage1-extract"
        )
    try:
        meta = ShardMetadata.from_json(raw)
    except ShardFormatError as exc:
        raise ShardFormatError(f"{where}: {exc}") from None
    expected = shard_schema(meta)
    for field in expected:
        if field.name in OPTIONAL_COLUMNS and field.name not in schema.names:
            continue  # written before the column existed: reads as all null
        if field.name not in schema.names or schema.field(field.name).type != field.type:
            got = schema.field(field.name).type if field.name in schema.names else "missing"
            raise ShardFormatError(f"{where}: column {field.name!r} should be {field.type}, found {got}")
        if schema.field(field.name).nullable and not field.nullable:  # our writer stores these as required
            raise ShardFormatError(f"{where}: column {field.name!r} may hold nulls; in a shard it never does")
    return meta


def read_metadata(path: str | os.PathLike) -> ShardMetadata:
    """The validated metadata of one shard file."""
    fs, full = resolve(path)
    return _meta_of(_open(fs, full).schema_arrow, full)


def _check_compatible(metas: Iterable[tuple[str, ShardMetadata]]) -> ShardMetadata | None:
    first: tuple[str, ShardMetadata] | None = None
    for where, meta in metas:
        if first is None:
            first = (where, meta)
        elif meta.compatibility_key() != first[1].compatibility_key():
            raise IncompatibleShardsError(
                "shards were made differently and cannot be mixed:\n"
                f"  {first[0]}: {first[1].describe()} preprocessing={first[1].preprocessing}\n"
                f"  {where}: {meta.describe()} preprocessing={meta.preprocessing}\n"
                "Extract each backbone into its own output directory."
            )
    return None if first is None else first[1]


@dataclasses.dataclass
class FeatureSet:
    """All rows of a shard directory: vectors as one (n, dim) float32 matrix plus per-row columns."""

    paths: np.ndarray  # object array of str
    labels: np.ndarray  # object array of str or None
    content_ids: np.ndarray
    features: np.ndarray  # (n, dim) float32
    metadata: ShardMetadata | None
    shard_files: list[str]
    groups: np.ndarray | None = None  # object array of str or None per row (all None when not given)
    duplicate_rows_dropped: int = 0  # rows that repeated a path and were left out (see read_features)

    def __post_init__(self) -> None:
        if self.groups is None:
            self.groups = np.full(len(self.paths), None, dtype=object)

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, rows: np.ndarray) -> "FeatureSet":
        """The rows ``rows`` (indices or a boolean mask), in that order."""
        return dataclasses.replace(self, paths=self.paths[rows], labels=self.labels[rows],
                                   content_ids=self.content_ids[rows], features=self.features[rows],
                                   groups=self.groups[rows])


def _copy_features(column: pa.ChunkedArray, dim: int, out: np.ndarray) -> None:
    """Copy a ``fixed_size_list`` column into ``out`` (rows × dim) chunk by chunk: one copy, no Python per row."""
    row = 0
    for chunk in column.chunks:
        n = len(chunk)
        if n == 0:
            continue
        values = chunk.flatten() if chunk.offset else chunk.values
        out[row:row + n] = values.to_numpy(zero_copy_only=False).reshape(n, dim)
        row += n


def _with_optional_columns(table: pa.Table, columns: Sequence[str]) -> pa.Table:
    """``table`` restricted to ``columns``, adding all-null optional columns an older shard lacks."""
    for name in columns:
        if name not in table.column_names and name in OPTIONAL_COLUMNS:
            table = table.append_column(name, pa.nulls(table.num_rows, OPTIONAL_COLUMNS[name]))
    return table.select(list(columns))


def _read_tables(directory, columns: list[str]) -> tuple[list[pa.Table], list[str], ShardMetadata | None]:
    fs, _ = resolve(directory)
    files = list_shards(directory)
    tables, metas = [], []
    for path in files:
        pf = _open(fs, path)
        metas.append((path, _meta_of(pf.schema_arrow, path)))
        present = [c for c in columns if c in pf.schema_arrow.names]
        tables.append(_with_optional_columns(_read(pf, path, columns=present, use_threads=True), columns))
    meta = _check_compatible(metas)
    return tables, files, meta


def read_features(directory: str | os.PathLike, *, expect: ShardMetadata | None = None,
                  threads: int | None = None) -> FeatureSet:
    """Load every shard in ``directory`` (local path or URI) into memory.

    Every shard's schema and metadata are validated, shards made with different backbones,
    weights or preprocessing are refused (:class:`IncompatibleShardsError`), and with ``expect``
    the shards must also match that metadata (e.g. the one a trained model was made on).
    Shards are decoded in parallel threads straight into one preallocated float32 matrix.
    """
    from concurrent.futures import ThreadPoolExecutor

    fs, _ = resolve(directory)
    files = list_shards(directory)
    opened = [(path, _open(fs, path)) for path in files]
    meta = _check_compatible((path, _meta_of(pf.schema_arrow, path)) for path, pf in opened)
    if expect is not None and meta is not None and meta.compatibility_key() != expect.compatibility_key():
        raise IncompatibleShardsError(
            f"shards in {directory} ({meta.describe()}) were not made like the expected ones "
            f"({expect.describe()}): extract these images again with backbone {expect.backbone!r}"
        )
    dim = meta.feature_dim if meta else 0
    counts = [pf.metadata.num_rows for _, pf in opened]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    features = np.empty((int(starts[-1]), dim), dtype=np.float32)

    def load(i: int) -> pa.Table:
        table = _read(opened[i][1], opened[i][0], use_threads=False)
        if table.num_rows != counts[i]:
            raise ShardFormatError(f"{opened[i][0]}: row count differs from its footer")
        block = features[starts[i]:starts[i + 1]]
        _copy_features(table.column("feature"), dim, block)
        if not np.isfinite(block).all():
            bad = int((~np.isfinite(block).all(axis=1)).sum())
            raise ShardFormatError(f"{opened[i][0]}: {bad} feature vector(s) hold NaN or infinity; "
                                   "rerun stage1-extract with the same --images and --out to extract them again")
        return _with_optional_columns(table, ROW_COLUMNS)

    workers = threads or min(8, os.cpu_count() or 1, max(1, len(opened)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        small = list(pool.map(load, range(len(opened))))
    if small:
        table = pa.concat_tables([t.replace_schema_metadata(None) for t in small])
        columns = [np.asarray(table.column(c).to_pylist(), dtype=object) for c in ROW_COLUMNS]
    else:
        columns = [np.array([], dtype=object)] * len(ROW_COLUMNS)
    rows = FeatureSet(paths=columns[0], labels=columns[1], content_ids=columns[2], groups=columns[3],
                      features=features, metadata=meta, shard_files=files)
    return _drop_repeated_paths(rows, np.repeat(np.arange(len(files)), counts), directory)


ROW_COLUMNS = ["path", "label", "content_id", "group"]


def _drop_repeated_paths(rows: FeatureSet, shard_of_row: np.ndarray, directory) -> FeatureSet:
    """Exactly once per path: when rows repeat a path, keep the one from the newest shard.

    Stage 1 leaves a path in two shards only when a run stopped between writing new shards and removing
    the rows they replace, or when a shard file was copied; shard names sort by run, so the last file holds
    the newest row. Different paths with the same content are *not* repeats: they are exact-duplicate
    images, kept here and held in one split by stage 2.
    """
    n = len(rows)
    if n == 0:
        return rows
    paths = rows.paths.astype(str)
    # Newest shard first, then row order within a shard; np.unique keeps the first row of each path.
    order = np.lexsort((np.arange(n), -shard_of_row))
    _, first = np.unique(paths[order], return_index=True)
    if len(first) == n:
        return rows
    keep = np.sort(order[first])
    dropped = n - len(keep)
    counts = np.unique(paths, return_counts=True)
    example = counts[0][np.argmax(counts[1])]
    warnings.warn(
        f"{directory}: {dropped} row(s) repeat a path already in a newer shard (e.g. {example!r}); "
        "kept the newest row of each. Rerun stage1-extract on this directory to repair the shards.",
        stacklevel=3,
    )
    out = rows.take(keep)
    out.duplicate_rows_dropped = dropped
    return out


def read_index(directory: str | os.PathLike) -> tuple[pa.Table, ShardMetadata | None]:
    """The non-feature columns of every shard plus a ``shard`` column naming its file (for incremental runs)."""
    tables, files, meta = _read_tables(directory, INDEX_COLUMNS)
    parts = [
        t.replace_schema_metadata(None).append_column("shard", pa.array([f] * t.num_rows, pa.string()))
        for t, f in zip(tables, files)
    ]
    if not parts:
        empty = pa.schema([(c, pa.string()) for c in ("path", "label", "content_id")]
                          + [("file_size", pa.int64()), ("mtime_ns", pa.int64()), ("group", pa.string()),
                             ("shard", pa.string())])
        return empty.empty_table(), meta
    return pa.concat_tables(parts), meta
