"""A CSV/Parquet file list as input: a ``path`` column (relative to the list's folder, or absolute), optional
``label`` and ``group`` columns; rows that name nothing usable become problems, not errors."""

from __future__ import annotations

import math
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
    labels, label_notes = clean_values(labels, "label")
    groups, group_notes = clean_values(groups, "group")
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
        records.append(ImageRecord(p, abspath, label, group))
    records.sort(key=lambda r: r.path)
    return Listing(str(base), "file-list", records, problems, [], notes=label_notes + group_notes)


def _missing_markers() -> frozenset[str]:
    """The spellings of a missing value that pyarrow's (and pandas') CSV readers know: ``NA`` (R's
    ``write.csv``), ``NaN``, ``nan`` (pandas), ``NULL``, ``#N/A`` (spreadsheets)…"""
    import pyarrow.csv as pacsv

    return frozenset(pacsv.ConvertOptions().null_values)


def clean_values(values: list, column: str) -> tuple[list[str | None], list[str]]:
    """A ``label`` or ``group`` column as text: spaces around a value trimmed (``' cat '`` is ``cat``), and
    empty cells, missing-value markers (``NA``, ``NaN``…) and float NaN (a Parquet float column) as missing.
    Returns the values and the notes saying what was changed, for the run summary."""
    markers = _missing_markers()
    out: list[str | None] = []
    trimmed, as_missing = 0, {}
    for value in values:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            if value is not None:
                as_missing["NaN (float)"] = as_missing.get("NaN (float)", 0) + 1
            out.append(None)
            continue
        text = str(value)
        stripped = text.strip()
        if stripped != text:
            trimmed += 1
        if stripped in markers:
            if stripped:
                as_missing[repr(stripped)] = as_missing.get(repr(stripped), 0) + 1
            out.append(None)
            continue
        out.append(stripped)
    notes = []
    if as_missing:
        spelled = ", ".join(f"{k} ×{n}" for k, n in sorted(as_missing.items()))
        notes.append(f"{sum(as_missing.values())} row(s) whose {column} is a missing-value marker ({spelled}) "
                     f"are read as having no {column}" + (" (unlabelled)" if column == "label" else ""))
    if trimmed:
        notes.append(f"{trimmed} {column}(s) had spaces around them, trimmed (' cat ' is 'cat')")
    return out, notes
