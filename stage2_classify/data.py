"""Features and labels for training: load shards once, encode labels, split (stratified and seeded)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

import shardformat
from shardformat import ShardMetadata

SPLIT_NAMES = {"train": "train", "val": "validation", "valid": "validation", "validation": "validation",
               "test": "test"}


class DatasetError(ValueError):
    """The shards cannot be trained on as they are (no labels, one class, …)."""


@dataclasses.dataclass
class Dataset:
    features: np.ndarray  # (n, D) float32, labelled rows only
    labels: np.ndarray  # (n,) object, class names
    paths: np.ndarray  # (n,) object
    classes: list[str]
    metadata: ShardMetadata
    unlabelled: int
    source: str

    @property
    def y(self) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.fromiter((index[label] for label in self.labels), dtype=np.int64, count=len(self.labels))

    def counts(self) -> dict[str, int]:
        values, counts = np.unique(self.labels.astype(str), return_counts=True)
        return dict(zip(values.tolist(), counts.tolist()))


def load_dataset(shards: str | os.PathLike) -> Dataset:
    """Every labelled row of the shard directory ``shards``; unlabelled rows are counted and left out."""
    fs = shardformat.read_features(shards)
    if len(fs) == 0 or fs.metadata is None:
        raise DatasetError(f"{shards}: no feature shards found; run stage1-extract --out {shards} first")
    has_label = np.fromiter((lbl is not None for lbl in fs.labels), dtype=bool, count=len(fs))
    labels = fs.labels[has_label]
    if len(labels) == 0:
        raise DatasetError(
            f"{shards}: none of the {len(fs)} rows has a label; extract from a class-folder tree or a list "
            "with a 'label' column to train"
        )
    classes = sorted(set(labels.tolist()))
    if len(classes) < 2:
        raise DatasetError(f"{shards}: only one class ({classes[0]!r}); a classifier needs at least two")
    return Dataset(
        features=fs.features[has_label] if not has_label.all() else fs.features,
        labels=labels,
        paths=fs.paths[has_label],
        classes=classes,
        metadata=fs.metadata,
        unlabelled=int((~has_label).sum()),
        source=os.fspath(shards),
    )


def stratified_split(labels: np.ndarray, *, val_fraction: float = 0.15, test_fraction: float = 0.15,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """Per class, a seeded shuffle cut into train / validation / test; the same seed gives the same split.

    Each class keeps at least one training example; a class too small for all three parts gives what it
    can to train first, then test, then validation.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "test": []}
    for cls in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        n = len(idx)
        n_test = int(round(n * test_fraction)) if n >= 3 else 0
        n_val = int(round(n * val_fraction)) if n >= 3 else 0
        if test_fraction > 0 and n >= 3:
            n_test = max(1, n_test)
        if val_fraction > 0 and n >= 3:
            n_val = max(1, n_val)
        n_train = n - n_test - n_val
        if n_train < 1:  # very small class: keep one for training
            n_val = max(0, n_val - 1)
            n_train = n - n_test - n_val
        parts["test"].append(idx[:n_test])
        parts["validation"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    return {k: np.sort(np.concatenate(v)) if v else np.zeros(0, np.int64) for k, v in parts.items()}


def split_from_file(paths: np.ndarray, split_file: str | os.PathLike) -> dict[str, np.ndarray]:
    """A user-given split: a CSV or Parquet file with columns ``path`` and ``split`` (train/val/test)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = os.fspath(split_file)
    table = pq.read_table(path) if path.endswith(".parquet") else pacsv.read_csv(path)
    if not {"path", "split"} <= set(table.column_names):
        raise DatasetError(f"{path}: a split file needs columns 'path' and 'split' (found {table.column_names})")
    mapping = {}
    for p, s in zip(table.column("path").to_pylist(), table.column("split").to_pylist()):
        name = SPLIT_NAMES.get(str(s).strip().lower())
        if name is None:
            raise DatasetError(f"{path}: split {s!r} for {p!r} is not one of train/val/test")
        mapping[p] = name
    assigned = np.array([mapping.get(p, "") for p in paths.tolist()], dtype=object)
    missing = int((assigned == "").sum())
    if missing == len(paths):
        raise DatasetError(f"{path}: none of the shard paths appear in the split file")
    out = {k: np.flatnonzero(assigned == k) for k in ("train", "validation", "test")}
    if missing:
        out["unassigned"] = np.flatnonzero(assigned == "")
    if len(out["train"]) == 0:
        raise DatasetError(f"{path}: no rows are in the 'train' split")
    return out
