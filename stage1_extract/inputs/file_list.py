"""A CSV/Parquet file list as input: a ``path`` column (relative to the list's folder, or absolute), optional
``label`` and ``group`` columns; rows that name nothing usable become problems, not errors."""

from __future__ import annotations

import os
from pathlib import Path

from stage1_extract.decoding.files import split_frame_ref
from stage1_extract.inputs.records import ImageRecord, Listing
from stage1_extract.errors import InputError


def list_file(path: Path) -> Listing:
    """The records of the file list ``path`` (``.csv``, ``.tsv`` or ``.parquet``)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            table = pq.read_table(path)
        elif suffix in (".csv", ".tsv", ".txt"):
            opts = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",", newlines_in_values=True)
            conv = pacsv.ConvertOptions(column_types={"path": "string", "label": "string", "group": "string"})
            table = pacsv.read_csv(path, parse_options=opts, convert_options=conv)
        else:
            raise InputError(f"--images {path}: a file list must be .csv, .tsv or .parquet")
    except (OSError, ValueError) as exc:
        if isinstance(exc, ValueError) and str(exc).startswith("--images"):
            raise
        raise InputError(f"--images {path}: cannot read the file list: {exc}") from None
    if "path" not in table.column_names:
        raise InputError(f"--images {path}: the file list needs a 'path' column (found {table.column_names})")
    paths = table.column("path").to_pylist()
    labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * len(paths)
    groups = table.column("group").to_pylist() if "group" in table.column_names else [None] * len(paths)
    base = path.parent.resolve()
    records, problems, seen_paths = [], [], set()
    for p, label, group in zip(paths, labels, groups):
        if p is None or p == "":
            problems.append(("(empty)", "file list row with an empty path"))
            continue
        if p in seen_paths:
            problems.append((p, "listed more than once; kept the first"))
            continue
        seen_paths.add(p)
        abspath = p if os.path.isabs(p) else str(base / p)
        file = split_frame_ref(abspath)[0]  # a row may name one frame of a multi-frame DICOM: scan.dcm#frame=3
        if os.path.isdir(file):
            problems.append((p, "is a directory"))
            continue
        if not os.path.exists(file):
            problems.append((p, "listed file does not exist" if not os.path.islink(file) else "broken symbolic link"))
            continue
        if not os.path.isfile(file):  # a FIFO or device: reading it could block or never end
            problems.append((p, "not a regular file"))
            continue
        records.append(ImageRecord(p, abspath, None if label is None or label == "" else str(label),
                                   None if group is None or group == "" else str(group)))
    records.sort(key=lambda r: r.path)
    return Listing(str(base), "file-list", records, problems, [])
