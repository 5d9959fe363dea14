"""A fine-tune's data: the frozen run's own split (``split.csv``), its images found again and checked by content.

Every row keeps the split the frozen run gave it, so frozen and fine-tuned numbers are comparable image for
image and the fine-tune never sees a test image: only ``train`` rows are trained on, ``validation`` rows stop
it early, ``test`` rows are never decoded here. A file whose content changed since extraction is left out
(its content identity no longer matches the split), and said so.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from shardformat.layout import read_run_summary
from stage2_classify.errors import DatasetError


@dataclasses.dataclass
class RunRows:
    """The frozen run's labelled rows: file path (absolute), stored path, content id, class index, group, split."""

    classes: list[str]
    files: np.ndarray
    paths: np.ndarray
    content_ids: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    splits: np.ndarray
    root: str

    def take(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)


def images_root(run: Path, images) -> str:
    """Where the run's stored paths are relative to: ``images`` when given, else the root stage 1 recorded."""
    if images is not None:
        root = Path(images).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"--images {root}: no such folder or file list")
        return os.fspath(root.parent if root.is_file() else root)
    config = json.loads((run / "config.json").read_text())
    recorded = read_run_summary(config.get("shards", "")).get("images_root") if config.get("shards") else None
    if not recorded:
        raise DatasetError(f"{run}: the images its vectors came from are not recorded; pass --images (the folder "
                           "or file list given to stage1-extract)")
    return recorded


def run_rows(run: str | os.PathLike, images=None) -> RunRows:
    """The rows of the run's ``split.csv`` with their files resolved against :func:`images_root`."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    run = Path(run)
    classes = [str(c) for c in json.loads((run / "labels.json").read_text())]
    try:
        table = pacsv.read_csv(run / "split.csv", convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in ("path", "content_id", "label", "group", "split")},
            strings_can_be_null=True))
    except (OSError, pa.ArrowInvalid) as exc:
        raise DatasetError(f"{run / 'split.csv'}: cannot read the run's split ({exc}); fine-tuning needs the run's "
                           "own split (train the run again)") from None
    col = {c: np.asarray(table.column(c).to_pylist(), dtype=object) for c in table.column_names}
    index = {c: i for i, c in enumerate(classes)}
    known = np.asarray([lab in index for lab in col["label"]])
    if not known.all():
        raise DatasetError(f"{run / 'split.csv'}: labels {sorted(set(col['label'][~known]))[:5]} are not the run's "
                           "classes (labels.json)")
    root = images_root(run, images)
    files = np.asarray([p if os.path.isabs(p) else os.path.join(root, p) for p in col["path"]], dtype=object)
    groups = col.get("group", np.full(len(files), None, dtype=object))
    return RunRows(classes, files, col["path"], col["content_id"], np.asarray([index[v] for v in col["label"]]),
                   groups, col["split"], root)


@dataclasses.dataclass
class Pixels:
    """Decoded rows of one split: ``x`` N×S×S×3 uint8 as stage 1 decodes them, ``y`` class indices."""

    x: np.ndarray
    y: np.ndarray
    rows: np.ndarray  # indices into RunRows
    skipped: list[tuple[str, str]]  # (file, why)


def decode_rows(rows: RunRows, which: np.ndarray, preprocessing) -> Pixels:
    """Decode the files of ``which`` exactly as stage 1 does; files gone, unreadable or changed are skipped."""
    from stage1_extract import content_id, load_pixels, split_frame_ref

    ok, skipped = [], []
    for i in which:
        try:  # a frame row ("scan.dcm#frame=3") has its file's content id
            with open(split_frame_ref(rows.files[i])[0], "rb") as fh:
                data = fh.read()
        except OSError as exc:
            skipped.append((rows.files[i], f"cannot be read ({exc.strerror or exc})"))
            continue
        if rows.content_ids[i] is not None and content_id(data) != rows.content_ids[i]:
            skipped.append((rows.files[i], "changed since its vector was extracted (its split is unknown)"))
            continue
        ok.append(i)
    pixels = load_pixels([rows.files[i] for i in ok], preprocessing)
    decoded = set(pixels.paths)
    skipped += [(p, why) for p, why in pixels.errors]
    kept = np.asarray([i for i in ok if rows.files[i] in decoded], np.int64)
    return Pixels(pixels.array, rows.y[kept], kept, skipped)


def summarise_skips(name: str, skipped: list[tuple[str, str]], total: int) -> str | None:
    """One note about the files of a split that could not be used, or None."""
    if not skipped:
        return None
    path, why = skipped[0]
    if len(skipped) == total:
        raise DatasetError(f"none of the {total} {name} images of the run could be used (e.g. {path}: {why}); "
                           "pass --images with the folder or file list the run's vectors came from")
    return f"{len(skipped)} of {total} {name} images left out (e.g. {path}: {why})"
