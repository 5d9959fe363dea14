"""Features and labels for training: load shards once, in a canonical order, and encode labels.

The (n, D) float32 matrix comes from ``shardformat.read_features`` (parallel decode into one preallocated
array, one row per path); labels are encoded with ``np.unique``. Rows are put in a canonical order (by
content_id, then path) before anything else, so that the same images give the same split, the same
training batches and the same numbers whatever order the shards hold them in. Splits: ``data/split.py``.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

import shardformat
from hybrid_common import renamed_keywords
from shardformat import ShardMetadata
from stage2_classify.errors import DatasetError

__all__ = ["Dataset", "DatasetError", "MIN_ROWS_PER_CLASS", "labelled_mask", "load_dataset"]


@dataclasses.dataclass
class Dataset:
    features: np.ndarray  # (n, D) float32, labelled rows only
    y: np.ndarray  # (n,) int64 index into classes
    paths: np.ndarray  # (n,) object
    classes: list[str]
    metadata: ShardMetadata
    unlabelled: int  # rows left out because they carry no label
    source: str
    content_ids: np.ndarray | None = None  # (n,) object: the image's content hash (split key)
    groups: np.ndarray | None = None  # (n,) object: group (e.g. patient) or None
    duplicate_rows_dropped: int = 0  # shard rows that repeated a path (the reader kept the newest)

    def __post_init__(self) -> None:
        if self.content_ids is None:  # a Dataset built by hand: each path is its own content
            self.content_ids = np.asarray(self.paths, dtype=object)
        if self.groups is None:
            self.groups = np.full(len(self.y), None, dtype=object)

    @property
    def labels(self) -> np.ndarray:
        """Class names per row (derived from ``y``; assigning names re-encodes ``y``)."""
        return np.asarray(self.classes, dtype=object)[self.y]

    @labels.setter
    def labels(self, names) -> None:
        names = np.asarray(names).astype(str)
        classes = np.asarray(self.classes, dtype=str)
        order = np.argsort(classes)
        pos = np.searchsorted(classes, names, sorter=order).clip(0, len(classes) - 1)
        if not (classes[order[pos]] == names).all():
            raise ValueError(f"labels outside the dataset's classes {self.classes}")
        self.y = order[pos].astype(np.int64)

    def counts(self) -> dict[str, int]:
        return dict(zip(self.classes, np.bincount(self.y, minlength=len(self.classes)).tolist()))


def labelled_mask(labels: np.ndarray) -> np.ndarray:
    """True where a row has a label (the shard's ``label`` is not null)."""
    return np.asarray(labels != None, dtype=bool)  # noqa: E711  (elementwise on an object array)


@renamed_keywords(shards="features")
def load_dataset(features: str | os.PathLike, *, expect: ShardMetadata | None = None) -> Dataset:
    """Every labelled row of the feature folder ``features``; unlabelled rows are counted and left out.

    Shards whose metadata disagree (backbone, weights, preprocessing, dimension) are refused by
    ``shardformat`` with an :class:`~shardformat.IncompatibleShardsError` naming both files.
    """
    fs = shardformat.read_features(features, expect=expect)
    if len(fs) == 0 or fs.metadata is None:
        raise DatasetError(f"{os.fspath(features)}: no feature shards (part-*.parquet) found; "
                           f"run stage1-extract --out {os.fspath(features)} first")
    has_label = labelled_mask(fs.labels)
    n_labelled = int(has_label.sum())
    if n_labelled == 0:
        raise DatasetError(
            f"{os.fspath(features)}: none of the {len(fs)} rows has a label; extract from a class-folder tree or "
            "a file list with a 'label' column to train"
        )
    rows = np.flatnonzero(has_label)
    # Canonical order: the shards' row order (extraction order, file list order) must not change anything.
    rows = rows[np.lexsort((fs.paths[rows].astype(str), fs.content_ids[rows].astype(str)))]
    labels = fs.labels[rows]
    classes, y = np.unique(labels.astype(str), return_inverse=True)
    if len(classes) < 2:
        raise DatasetError(f"{os.fspath(features)}: only one class ({str(classes[0])!r}) among {n_labelled} labelled "
                           "rows; a classifier needs at least two")
    _refuse_degenerate(os.fspath(features), classes, np.bincount(y.reshape(-1), minlength=len(classes)))
    return Dataset(
        features=fs.features if np.array_equal(rows, np.arange(len(fs))) else fs.features[rows],
        y=y.astype(np.int64).reshape(-1),
        paths=fs.paths[rows],
        classes=classes.tolist(),
        metadata=fs.metadata,
        unlabelled=len(fs) - n_labelled,
        source=os.fspath(features),
        content_ids=fs.content_ids[rows],
        groups=fs.groups[rows],
        duplicate_rows_dropped=fs.duplicate_rows_dropped,
    )


MIN_ROWS_PER_CLASS = 3  # one row each for training, validation and test; two such classes or no score means anything


def _refuse_degenerate(where: str, classes, counts: np.ndarray) -> None:
    """A clear error instead of a model scored on one or two rows (e.g. ``--images`` pointed at one class
    folder, whose sub-folders then became the classes)."""
    usable = int((counts >= MIN_ROWS_PER_CLASS).sum())
    if usable >= 2:
        return
    shown = ", ".join(f"{c}: {n}" for c, n in list(zip(map(str, classes), counts.tolist()))[:10])
    raise DatasetError(
        f"{where}: too little data to train and evaluate a classifier: {int(counts.sum())} labelled rows in "
        f"{len(classes)} classes ({shown}{', …' if len(classes) > 10 else ''}); it needs two classes with "
        f"{MIN_ROWS_PER_CLASS} rows or more. If --images pointed at one class folder, point it "
        "at the folder that holds one sub-folder per class."
    )
