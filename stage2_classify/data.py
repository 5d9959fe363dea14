"""Features and labels for training: load shards once, encode labels, split (stratified and seeded, or a file).

Everything here is vectorised: the (n, D) float32 matrix comes from ``shardformat.read_features`` (parallel
decode into one preallocated array); labels are encoded with ``np.unique``; a split file is joined to the
shard paths with Arrow's ``index_in``. No Python loop runs per row.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

import shardformat
from shardformat import ShardMetadata

SPLITS = ("train", "validation", "test")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "validation", "valid": "validation",
               "validation": "validation", "dev": "validation", "test": "test"}


class DatasetError(ValueError):
    """The shards (or a split file) cannot be trained on as they are: no labels, one class, …"""


@dataclasses.dataclass
class Dataset:
    features: np.ndarray  # (n, D) float32, labelled rows only
    y: np.ndarray  # (n,) int64 index into classes
    paths: np.ndarray  # (n,) object
    classes: list[str]
    metadata: ShardMetadata
    unlabelled: int  # rows left out because they carry no label
    source: str

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


def load_dataset(shards: str | os.PathLike, *, expect: ShardMetadata | None = None) -> Dataset:
    """Every labelled row of the shard directory ``shards``; unlabelled rows are counted and left out.

    Shards whose metadata disagree (backbone, weights, preprocessing, dimension) are refused by
    ``shardformat`` with an :class:`~shardformat.IncompatibleShardsError` naming both files.
    """
    fs = shardformat.read_features(shards, expect=expect)
    if len(fs) == 0 or fs.metadata is None:
        raise DatasetError(f"{os.fspath(shards)}: no feature shards (part-*.parquet) found; "
                           f"run stage1-extract --out {os.fspath(shards)} first")
    has_label = labelled_mask(fs.labels)
    n_labelled = int(has_label.sum())
    if n_labelled == 0:
        raise DatasetError(
            f"{os.fspath(shards)}: none of the {len(fs)} rows has a label; extract from a class-folder tree or "
            "a file list with a 'label' column to train"
        )
    everything = n_labelled == len(fs)
    labels = fs.labels if everything else fs.labels[has_label]
    classes, y = np.unique(labels.astype(str), return_inverse=True)
    if len(classes) < 2:
        raise DatasetError(f"{os.fspath(shards)}: only one class ({str(classes[0])!r}) among {n_labelled} labelled "
                           "rows; a classifier needs at least two")
    _refuse_degenerate(os.fspath(shards), classes, np.bincount(y.reshape(-1), minlength=len(classes)))
    return Dataset(
        features=fs.features if everything else fs.features[has_label],
        y=y.astype(np.int64).reshape(-1),
        paths=fs.paths if everything else fs.paths[has_label],
        classes=classes.tolist(),
        metadata=fs.metadata,
        unlabelled=len(fs) - n_labelled,
        source=os.fspath(shards),
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


def stratified_split(y: np.ndarray, *, val_fraction: float = 0.15, test_fraction: float = 0.15,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """Per class, a seeded shuffle cut into train / validation / test; the same seed gives the same split.

    ``y`` holds class indices or names. Each class gives ``round(n · fraction)`` rows (at least one) to
    validation and to test when it has 3 or more rows, and always keeps at least one for training. A class
    with fewer than 3 rows goes to training only (see :func:`split_notes`).
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) "
                         "and sum to less than 1")
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    _, codes = np.unique(y, return_inverse=True)
    codes = codes.reshape(-1)
    order = np.argsort(codes, kind="stable")  # rows grouped by class, in row order within a class
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for idx in np.split(order, bounds):
        idx = idx[rng.permutation(len(idx))]
        n = len(idx)
        n_test = n_val = 0
        if n >= 3:
            n_test = max(1, int(round(n * test_fraction))) if test_fraction > 0 else 0
            n_val = max(1, int(round(n * val_fraction))) if val_fraction > 0 else 0
            while n - n_test - n_val < 1:  # keep one for training
                if n_val >= n_test and n_val > 0:
                    n_val -= 1
                else:
                    n_test -= 1
        parts["test"].append(idx[:n_test])
        parts["validation"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    return {k: np.sort(np.concatenate(v)).astype(np.int64) if v else np.zeros(0, np.int64)
            for k, v in parts.items()}


def read_split_file(split_file: str | os.PathLike):
    """(paths, split names) from a CSV or Parquet file with columns ``path`` and ``split``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = os.fspath(split_file)
    try:
        if path.lower().endswith((".parquet", ".pq")):
            table = pq.read_table(path)
        else:
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
                column_types={"path": pa.string(), "split": pa.string()}))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"{path}: cannot read the split file ({exc})") from None
    if not {"path", "split"} <= set(table.column_names):
        raise DatasetError(f"{path}: a split file needs columns 'path' and 'split' (found {table.column_names})")
    paths = table.column("path").cast(pa.string())
    names = pc.utf8_lower(pc.utf8_trim_whitespace(table.column("split").cast(pa.string())))
    if paths.null_count or names.null_count:
        raise DatasetError(f"{path}: empty 'path' or 'split' cells")
    known = pa.array(list(SPLIT_NAMES))
    bad = pc.unique(pc.filter(names, pc.invert(pc.is_in(names, value_set=known)))).to_pylist()
    if bad:
        raise DatasetError(f"{path}: unknown split names {bad[:5]}; use train, val (or validation) and test")
    canonical = pc.take(pa.array(list(SPLIT_NAMES.values())), pc.index_in(names, value_set=known))
    return paths, canonical


def split_from_file(paths: np.ndarray, split_file: str | os.PathLike) -> dict[str, np.ndarray]:
    """A user-given split: rows whose ``path`` the file assigns to train/val/test; the others are ``unassigned``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    where = os.fspath(split_file)
    file_paths, file_splits = read_split_file(split_file)
    unique_paths = pc.unique(file_paths)
    if len(unique_paths) != len(file_paths):
        pairs = pa.table({"p": file_paths, "s": file_splits}).group_by("p").aggregate([("s", "count_distinct")])
        clash = pc.filter(pairs.column("p"), pc.greater(pairs.column("s_count_distinct"), 1)).to_pylist()
        if clash:
            raise DatasetError(f"{where}: paths assigned to more than one split, e.g. {clash[:3]}")
    file_codes = pc.index_in(file_splits, value_set=pa.array(SPLITS)).to_numpy(zero_copy_only=False)
    pos = pc.index_in(pa.array(paths, pa.string()), value_set=file_paths)  # row -> line in the file, or null
    found = pc.is_valid(pos).to_numpy(zero_copy_only=False)
    codes = np.full(len(paths), -1, np.int64)
    codes[found] = file_codes[pc.drop_null(pos).to_numpy()]
    if not found.any():
        raise DatasetError(f"{where}: none of the {len(paths)} shard paths appear in the split file "
                           "(paths must match the shards' 'path' column, e.g. 'cat/001.jpg')")
    out = {name: np.flatnonzero(codes == i) for i, name in enumerate(SPLITS)}
    if not found.all():
        out["unassigned"] = np.flatnonzero(~found)
    if len(out["train"]) == 0:
        raise DatasetError(f"{where}: no labelled rows are in the 'train' split")
    return out


def split_notes(y: np.ndarray, classes: list[str], split: dict[str, np.ndarray]) -> list[str]:
    """Human notes on a split: classes missing from validation or test, rows the split file left out."""
    notes = []
    for name in ("validation", "test"):
        idx = split.get(name, np.zeros(0, np.int64))
        if len(idx) == 0:
            notes.append(f"the {name} split is empty")
            continue
        counts = np.bincount(y[idx], minlength=len(classes))
        train_counts = np.bincount(y[split["train"]], minlength=len(classes))
        missing = [c for c, k, t in zip(classes, counts, train_counts) if k == 0 and t > 0]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            notes.append(f"no {name} rows for {shown} (fewer than 3 examples to stratify; kept for training)")
    untrained = [c for c, t in zip(classes, np.bincount(y[split["train"]], minlength=len(classes))) if t == 0]
    if untrained:
        notes.append(f"no training rows for {', '.join(untrained[:5])}: the model cannot learn these classes")
    if len(split.get("unassigned", ())):
        notes.append(f"{len(split['unassigned'])} labelled rows are not in the split file and were left out")
    return notes
