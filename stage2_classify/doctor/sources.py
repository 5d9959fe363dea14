"""What the doctor reads besides the shards: each row's split, the out-of-fold probabilities, the image root.

Splits come from a training run's ``split.csv`` (``split.json`` for older runs), a split file, or the split
``train`` makes by default; out-of-fold probabilities from a file or DataFrame the caller gives, or from
``cross_validate``. Everything is aligned to the shard rows, with notes for what is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from shardformat.layout import read_run_summary
from stage2_classify.errors import DoctorError
from stage2_classify.options import TrainOptions


def row_splits(paths, content_ids, labels, groups, run, split_file, seed, notes) -> tuple[np.ndarray, str]:
    """Each row's split name (train / validation / test), or "" where unknown, and where they came from.

    A run's ``split.csv`` (``split.json`` for older runs) or a split file is matched by path first, then by
    content id, so two copies the file put in different splits show up as a leak. Without either, the split
    ``train`` would make by default (keyed by content, so exact copies share a split) is checked.
    """
    from stage2_classify.data.splitfile import read_split_file

    splits = np.full(len(paths), "", dtype=object)
    if run is not None:
        run_dir = Path(run).expanduser()
        split_file = next((run_dir / n for n in ("split.csv", "split.json") if (run_dir / n).is_file()), None)
        if split_file is None:
            raise DoctorError(f"{run_dir}: no split.csv or split.json; pass the directory train wrote")
    if split_file is not None:
        table = read_split_file(split_file).to_pandas()
        by_path = table.dropna(subset=["path"]).drop_duplicates("path").set_index("path")["split"]
        by_content = table.dropna(subset=["content_id"]).drop_duplicates("content_id").set_index("content_id")["split"]
        found = by_path.reindex(paths).to_numpy(dtype=object)
        missing = pd.isna(found)
        found[missing] = by_content.reindex(content_ids[missing]).to_numpy(dtype=object)
        known = pd.notna(found)
        splits[known] = found[known]
        if not known.any():
            raise DoctorError(f"{split_file}: none of the shards' paths or content ids are in it")
        if not known.all():
            notes.append(f"{int((~known).sum())} rows are not in {Path(split_file).name}: their split is unknown")
        return splits, os.fspath(split_file)
    from stage2_classify.data.split import content_split

    labelled = np.flatnonzero(labels != "")
    parts = content_split(content_ids[labelled], labels[labelled].astype(str), groups[labelled],
                          val_fraction=TrainOptions.val_fraction, test_fraction=TrainOptions.test_fraction, seed=seed)
    for name, rows in parts.items():
        splits[labelled[rows]] = name
    return splits, f"train's default content-keyed split, seed {seed}"


def oof_probabilities(shards, oof, paths, labels, has_label, folds, seed, progress, notes):
    """(n, k) out-of-fold probabilities aligned to the shard rows (NaN where missing), the classes, a source."""
    if oof is None:
        from stage2_classify.training.cv import cross_validate

        if len(set(labels[has_label])) < 2:  # duplicates and outliers still make sense without labels
            notes.append("label issues not checked: they need labelled images of at least two classes")
            return np.full((len(paths), 0), np.nan), [], "none"
        result = cross_validate(shards, folds=folds, seed=seed, head="fast-linear", progress=progress)
        frame, classes, source = result.oof, list(result.classes), f"{folds}-fold cross-validation, seed {seed}"
    else:
        source = "given DataFrame" if isinstance(oof, pd.DataFrame) else os.fspath(oof)
        frame = oof if isinstance(oof, pd.DataFrame) else read_table(oof)
        classes = None
    prob_columns = [c for c in frame.columns if str(c).startswith("prob_")]
    if "path" not in frame.columns or not prob_columns:
        raise DoctorError(f"{source}: out-of-fold probabilities need a 'path' column and prob_<class> columns "
                          f"(found {list(frame.columns)[:8]})")
    if classes is None:
        classes = [c[len("prob_"):] for c in prob_columns]
    columns = [f"prob_{c}" for c in classes]
    order = np.argsort(classes)
    classes = [classes[i] for i in order]
    columns = [columns[i] for i in order]
    frame = frame.drop_duplicates("path", keep="last").set_index("path")
    aligned = frame.reindex(paths)
    probs = aligned[columns].to_numpy(dtype=np.float64, na_value=np.nan)
    if "label" in frame.columns:
        stated = aligned["label"].to_numpy(dtype=object)
        known = pd.notna(stated) & has_label
        stale = int((stated[known].astype(str) != labels[known].astype(str)).sum())
        if stale:
            raise DoctorError(f"{source}: {stale} rows have another label than in the shards; the out-of-fold "
                              "probabilities are stale: compute them again")
    missing = int((has_label & ~np.isfinite(probs).all(axis=1)).sum())
    if missing == int(has_label.sum()):
        raise DoctorError(f"{source}: none of the shards' labelled paths has out-of-fold probabilities")
    if missing:
        notes.append(f"{missing} labelled rows have no out-of-fold probabilities and were not checked for label "
                     "issues")
    unknown = sorted(set(labels[has_label]) - set(classes))
    if unknown:
        notes.append(f"classes without out-of-fold probabilities (not checked): {', '.join(unknown[:5])}")
    return probs, classes, source


def read_table(path) -> pd.DataFrame:
    text = os.fspath(path)
    try:
        if text.lower().endswith((".parquet", ".pq")):
            return pd.read_parquet(text)
        return pd.read_csv(text)
    except (OSError, ValueError) as exc:
        raise DoctorError(f"{text}: cannot read out-of-fold probabilities ({exc})") from None


def images_root(shards, images, notes) -> str | None:
    """Where thumbnails are read from: ``images``, else the root stage 1 recorded in its run summary."""
    if images is not None:
        return os.fspath(images)
    recorded = read_run_summary(shards).get("images_root")
    if not recorded:
        notes.append("no image root (pass --images ROOT): the report shows no thumbnails")
    return recorded
