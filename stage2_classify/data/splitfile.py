"""Frozen splits: every run writes ``split.csv``; ``--split-file`` reads it back (or an older path,split file).

``split.csv`` has one row per labelled image used: ``path, content_id, label, group, split``. Read back, a
row of the shards is matched by ``content_id`` first (so the split survives renamed or moved files, another
backbone, a file list instead of folders), then by ``path`` (for files that carry no content id). Rows the
file does not mention are left out of training and evaluation, and counted.
"""

from __future__ import annotations

import json
import os

import numpy as np

from stage2_classify.errors import DatasetError
from stage2_classify.data.split import SPLITS, split_codes

SPLIT_NAMES = {"train": "train", "training": "train", "val": "validation", "valid": "validation",
               "validation": "validation", "dev": "validation", "test": "test"}
COLUMNS = ("path", "content_id", "label", "group", "split")


def read_split_file(split_file: str | os.PathLike):
    """A pyarrow table with string columns ``path``, ``content_id`` (may be all null) and canonical ``split``.

    Accepts ``split.csv`` (or Parquet) from a run, a user's ``path,split`` CSV/Parquet, and the ``split.json``
    of runs made before ``split.csv`` existed.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = os.fspath(split_file)
    try:
        if path.lower().endswith(".json"):
            with open(path) as fh:
                raw = json.load(fh)
            if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
                raise DatasetError(f"{path}: a JSON split file maps split names to lists of paths")
            table = pa.table({"path": [p for v in raw.values() for p in v],
                              "split": [k for k, v in raw.items() for _ in v]})
        elif path.lower().endswith((".parquet", ".pq")):
            table = pq.read_table(path)
        else:
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in COLUMNS}, strings_can_be_null=True))
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"{path}: cannot read the split file ({exc})") from None
    if not {"path", "split"} <= set(table.column_names) and not {"content_id", "split"} <= set(table.column_names):
        raise DatasetError(f"{path}: a split file needs columns 'split' and 'path' (or 'content_id'); found "
                           f"{table.column_names}")
    n = table.num_rows
    column = {c: table.column(c).cast(pa.string()) if c in table.column_names else pa.nulls(n, pa.string())
              for c in ("path", "content_id")}
    names = pc.utf8_lower(pc.utf8_trim_whitespace(table.column("split").cast(pa.string())))
    if names.null_count or pc.sum(pc.and_(column["path"].is_null(), column["content_id"].is_null())).as_py():
        raise DatasetError(f"{path}: empty 'split' cells, or rows with neither a path nor a content_id")
    known = pa.array(list(SPLIT_NAMES))
    bad = pc.unique(pc.filter(names, pc.invert(pc.is_in(names, value_set=known)))).to_pylist()
    if bad:
        raise DatasetError(f"{path}: unknown split names {bad[:5]}; use train, val (or validation) and test")
    canonical = pc.take(pa.array(list(SPLIT_NAMES.values())), pc.index_in(names, value_set=known))
    return pa.table({"path": column["path"], "content_id": column["content_id"], "split": canonical})


def _lookup(keys: np.ndarray, file_keys, file_codes: np.ndarray, where: str, what: str) -> np.ndarray:
    """Split code per row from the file rows whose ``what`` equals the row's; -1 where none. One split per key."""
    import pyarrow as pa
    import pyarrow.compute as pc

    mask = file_keys.is_valid()
    if not pc.any(mask).as_py():
        return np.full(len(keys), -1, np.int64)
    file_keys = pc.filter(file_keys, mask)
    codes = file_codes[mask.to_numpy(zero_copy_only=False)]
    pairs = pa.table({"k": file_keys, "s": codes}).group_by("k").aggregate([("s", "min"), ("s", "max")])
    clash = pc.filter(pairs.column("k"), pc.not_equal(pairs.column("s_min"), pairs.column("s_max"))).to_pylist()
    if clash:
        raise DatasetError(f"{where}: the same {what} is assigned to more than one split, e.g. {clash[:3]}")
    pos = pc.index_in(pa.array(keys, pa.string()), value_set=pairs.column("k"))
    found = pc.is_valid(pos).to_numpy(zero_copy_only=False)
    out = np.full(len(keys), -1, np.int64)
    out[found] = pairs.column("s_min").to_numpy()[pc.drop_null(pos).to_numpy()]
    return out


def split_from_file(paths: np.ndarray, split_file: str | os.PathLike,
                    content_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A frozen split: rows matched to the file by content_id, then by path; others are ``unassigned``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    where = os.fspath(split_file)
    table = read_split_file(split_file)
    file_codes = pc.index_in(table.column("split"), value_set=pa.array(SPLITS)).to_numpy(zero_copy_only=False)
    codes = np.full(len(paths), -1, np.int64)
    if content_ids is not None:
        codes = _lookup(np.asarray(content_ids, dtype=object), table.column("content_id"), file_codes, where,
                        "content_id")
    by_path = _lookup(np.asarray(paths, dtype=object), table.column("path"), file_codes, where, "path")
    codes = np.where(codes >= 0, codes, by_path)
    found = codes >= 0
    if not found.any():
        raise DatasetError(f"{where}: none of the {len(paths)} shard rows appear in the split file "
                           "(rows match by content_id, or by path as in the shards' 'path' column, e.g. 'cat/001.jpg')")
    out = {name: np.flatnonzero(codes == i) for i, name in enumerate(SPLITS)}
    if not found.all():
        out["unassigned"] = np.flatnonzero(~found)
    if len(out["train"]) == 0:
        raise DatasetError(f"{where}: no labelled rows are in the 'train' split")
    return out


def split_table(paths, content_ids, labels, groups, split: dict[str, np.ndarray]):
    """The ``split.csv`` rows (every row in a split), sorted by content_id then path."""
    import pyarrow as pa

    codes = split_codes(split, len(paths))
    rows = np.flatnonzero(codes >= 0)
    rows = rows[np.lexsort((np.asarray(paths)[rows].astype(str), np.asarray(content_ids)[rows].astype(str)))]
    return pa.table({
        "path": pa.array(np.asarray(paths, dtype=object)[rows], pa.string()),
        "content_id": pa.array(np.asarray(content_ids, dtype=object)[rows], pa.string()),
        "label": pa.array(np.asarray(labels, dtype=object)[rows], pa.string()),
        "group": pa.array(np.asarray(groups, dtype=object)[rows], pa.string()),
        "split": pa.array(np.asarray(SPLITS, dtype=object)[codes[rows]], pa.string()),
    })


def write_split_csv(table, path: str) -> None:
    import pyarrow.csv as pacsv

    pacsv.write_csv(table, path)
