#!/usr/bin/env python3
"""Turn a folder of DICOM files plus a labels CSV into a stage-1 file list with ``path,label,group`` columns.

What: public radiology sets ship as a tree of DICOM files and a CSV of labels keyed by some identifier,
for example

* RSNA Pneumonia: ``stage_2_train_images/<patientId>.dcm`` + ``stage_2_train_labels.csv``
  (``patientId,…,Target``; one row per box, the same Target on each) →
  ``--key filename --key-column patientId --label-column Target``;
* SIIM-ACR Pneumothorax / other Kaggle sets: ``<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm`` + a CSV keyed
  by ``ImageId`` → ``--key SOPInstanceUID --key-column ImageId``;
* TCIA collections: ``<Collection>/<PatientID>/<study>/<series>/1-01.dcm`` + a clinical CSV per patient →
  ``--key PatientID --key-column "Patient ID"``.

The script reads each file's header only (pydicom, no pixel data), joins it to the CSV on the chosen key
(a DICOM keyword, or ``filename`` for the file name without extension), and writes ``OUT`` (``.csv`` or
``.parquet``) that ``stage1-extract --images OUT`` reads directly. ``group`` is stage 1's own salted hash of
the PatientID (``--group-by study``: StudyInstanceUID), with the same secret stage 1 uses (see
``stage1_extract.inputs.dicom_records``), so the file list and stage 1 agree; the raw identifiers are not
written. Paths are stored relative to OUT's folder; when folder or file names themselves are identifiers
(TCIA's ``<PatientID>/`` level), ``--link-dir`` writes neutral symbolic links
(``<link-dir>/<label>/<hash>.dcm``) and lists those instead, so no identifier reaches the shards' ``path``.

Files with no label row, rows that disagree about a key's label, unreadable files, and non-DICOM files are
counted and left out, never guessed.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import hmac
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path


def read_labels(path: Path, key_column: str, label_column: str) -> tuple[dict[str, str], int]:
    """key → label from the CSV; keys whose rows disagree are dropped (returned as a count)."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in (key_column, label_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column {missing[0]!r} (columns: {reader.fieldnames})")
        seen: dict[str, set[str]] = {}
        for row in reader:
            key, label = (row[key_column] or "").strip(), (row[label_column] or "").strip()
            if key and label:
                seen.setdefault(key, set()).add(label)
    labels = {k: next(iter(v)) for k, v in seen.items() if len(v) == 1}
    return labels, len(seen) - len(labels)


def _header(path: str, key: str):
    from stage1_extract.decoding.dicom import quiet_pydicom, read_dataset

    tags = ["PatientID", "StudyInstanceUID"] + ([] if key == "filename" else [key])
    with quiet_pydicom():  # pydicom's warnings can quote the values; they are converted lazily, below too
        try:
            ds = read_dataset(path, stop_before_pixels=True, specific_tags=tags)
            return {t: str(ds.get(t) or "").strip() for t in tags}
        except Exception:  # noqa: BLE001 - any unreadable header: counted, left out
            return None


def convert(images: Path, labels_csv: Path, out: Path, *, key: str = "filename", key_column: str,
            label_column: str, group_by: str = "patient", link_dir: Path | None = None,
            salt: str | None = None) -> dict:
    """Write the file list; returns counts (rows written, and each reason a file was left out)."""
    from stage1_extract.decoding.dicom import DICOM_EXTENSIONS, is_dicom_file
    from stage1_extract.inputs.dicom_records import group_id, group_salt

    if group_by not in ("patient", "study"):
        raise ValueError(f"--group-by must be patient or study, not {group_by!r}")
    labels, conflicting = read_labels(labels_csv, key_column, label_column)
    secret = group_salt(salt)
    base = out.resolve().parent
    counts: Counter = Counter(conflicting_label_keys=conflicting)
    rows = []
    for dirpath, dirnames, names in os.walk(images):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            if name.startswith(".") or not (os.path.splitext(name)[1].lower() in DICOM_EXTENSIONS
                                            or is_dicom_file(path)):
                counts["not_dicom"] += 1
                continue
            header = _header(path, key)
            if header is None:
                counts["unreadable"] += 1
                continue
            key_value = os.path.splitext(name)[0] if key == "filename" else header[key]
            label = labels.get(key_value)
            if label is None:
                counts["no_label"] += 1
                continue
            ident = header["PatientID" if group_by == "patient" else "StudyInstanceUID"]
            group = group_id(ident, secret, group_by) if ident else None
            counts["no_group"] += group is None
            target = os.path.abspath(path)
            if link_dir is not None:
                # keyed like the groups: a plain hash of a guessable path (…/LIDC-IDRI-0001/…) could be reversed
                neutral = hmac.new(secret, target.encode(), hashlib.sha256).hexdigest()[:20]
                link = link_dir / label / f"{neutral}.dcm"
                link.parent.mkdir(parents=True, exist_ok=True)
                if os.path.lexists(link):
                    os.unlink(link)
                os.symlink(target, link)
                target = str(link.absolute())
            rows.append((os.path.relpath(target, base), label, group))
    if not rows:
        raise ValueError(f"{images}: no DICOM file matched a label in {labels_csv} (key {key!r} against column "
                         f"{key_column!r}); left out: {dict(counts)}")
    _write(out, rows)
    return {"rows": len(rows), **{k: v for k, v in counts.items() if v}}


def _write(out: Path, rows: list[tuple]) -> None:
    """The file list as CSV or Parquet, through a temporary file and a rename (never half-written)."""
    import pyarrow as pa

    table = pa.table({"path": [r[0] for r in rows], "label": [r[1] for r in rows], "group": [r[2] for r in rows]})
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".parquet":
        from shardformat import atomic_write_table, resolve

        fs, full = resolve(str(out.resolve()))
        atomic_write_table(table, fs, full)
        return
    import pyarrow.csv as pacsv

    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            pacsv.write_csv(table, fh)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="example (RSNA Pneumonia): dicom_to_filelist.py stage_2_train_images "
                                "stage_2_train_labels.csv --key filename --key-column patientId "
                                "--label-column Target --out rsna.csv")
    p.add_argument("images", type=Path, help="folder of DICOM files (any depth)")
    p.add_argument("labels", type=Path, help="labels CSV")
    p.add_argument("--out", type=Path, required=True, help="file list to write (.csv or .parquet)")
    p.add_argument("--key", default="filename",
                   help="what identifies a file in the CSV: 'filename' (name without extension, default) or a "
                   "DICOM keyword such as SOPInstanceUID, PatientID, StudyInstanceUID, AccessionNumber")
    p.add_argument("--key-column", required=True, help="the CSV column holding that identifier")
    p.add_argument("--label-column", required=True, help="the CSV column holding the label")
    p.add_argument("--group-by", choices=["patient", "study"], default="patient",
                   help="group = salted hash of PatientID (default) or StudyInstanceUID")
    p.add_argument("--link-dir", type=Path, default=None,
                   help="list neutral symbolic links made here instead of the original paths (for trees whose "
                   "folder or file names are patient identifiers)")
    args = p.parse_args(argv)
    try:
        counts = convert(args.images, args.labels, args.out, key=args.key, key_column=args.key_column,
                         label_column=args.label_column, group_by=args.group_by, link_dir=args.link_dir)
    except (OSError, ValueError) as exc:
        print(f"dicom_to_filelist: error: {exc}", file=sys.stderr)
        return 1
    left_out = {k: v for k, v in counts.items() if k != "rows"}
    print(f"wrote {counts['rows']} rows to {args.out}" + (f"; left out: {left_out}" if left_out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
