"""Per-group (per-patient) results: one prediction per group, and metrics whose intervals resample groups.

A group's prediction is the **mean of its images' predicted probabilities** (soft voting): the group's
predicted class is the argmax of that mean, its probability the mean's largest value. Its true label is its
images' label; a group whose images carry several labels takes the most frequent one and is counted in
``mixed_label_groups`` (then per-group truth is ambiguous, and the report says so). Group-level metrics are
``classification_metrics`` of those rows, one per group, so their bootstrap resamples groups, not images;
``image_metrics_by_group`` adds image-level accuracy / balanced accuracy / macro-F1 with a *cluster*
bootstrap (whole groups resampled with all their images), the honest interval when images of one patient
are alike. Rows without a group are their own group (keyed by path).
"""

from __future__ import annotations

import numpy as np

from stage2_classify.evaluation.metrics import BOOTSTRAP_METRICS, classification_metrics


def _present(values: np.ndarray) -> np.ndarray:
    return np.array([v is not None and v == v and v != "" for v in values], dtype=bool)


def group_keys(groups: np.ndarray, paths: np.ndarray) -> np.ndarray:
    """Per row, its group's name, else ``image:<path>`` (an ungrouped image is a group of one)."""
    groups = np.asarray(groups, dtype=object)
    has = _present(groups)
    return np.array([str(g) if h else f"image:{p}" for g, h, p in zip(groups, has, paths)], dtype=object)


def group_predictions(proba: np.ndarray, groups: np.ndarray, paths: np.ndarray, classes: list[str],
                      y: np.ndarray | None = None):
    """A DataFrame, one row per group: ``group``, ``images``, ``predicted``, ``probability``, ``prob_<class>``
    (the mean over the group's images) and, with ``y``, ``label`` and ``mixed_labels``."""
    import pandas as pd

    keys = group_keys(groups, paths).astype(str)
    names, inverse = np.unique(keys, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(names))
    sums = np.zeros((len(names), len(classes)), np.float64)
    np.add.at(sums, inverse, np.asarray(proba, np.float64))
    mean = sums / counts[:, None]
    frame = pd.DataFrame({"group": names, "images": counts.astype(np.int64),
                          "predicted": np.asarray(classes, dtype=object)[mean.argmax(axis=1)],
                          "probability": mean.max(axis=1)})
    if y is not None:
        votes = np.zeros((len(names), len(classes)), np.int64)
        np.add.at(votes, (inverse, np.asarray(y, np.int64)), 1)
        frame["label"] = np.asarray(classes, dtype=object)[votes.argmax(axis=1)]
        frame["mixed_labels"] = (votes > 0).sum(axis=1) > 1
    for i, c in enumerate(classes):
        frame[f"prob_{c}"] = mean[:, i]
    return frame


def cluster_bootstrap(y: np.ndarray, pred: np.ndarray, keys: np.ndarray, n_classes: int, *,
                      resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Image-level accuracy, balanced accuracy and macro-F1 with percentile intervals from resampling
    whole groups (each resample: groups drawn with replacement, all their images counted)."""
    from stage2_classify.evaluation.metrics import summary_from_confusion

    _, inverse = np.unique(np.asarray(keys).astype(str), return_inverse=True)
    n_groups = int(inverse.max()) + 1 if len(inverse) else 0
    cells = np.asarray(y, np.int64) * n_classes + np.asarray(pred, np.int64)
    per_group = np.zeros((n_groups, n_classes * n_classes), np.float64)
    np.add.at(per_group, (inverse, cells), 1)
    point = summary_from_confusion(per_group.sum(axis=0).reshape(n_classes, n_classes))
    out = {m: float(point[m]) for m in BOOTSTRAP_METRICS}
    out["groups"] = n_groups
    if n_groups < 2:
        out["ci95"] = {m: None for m in BOOTSTRAP_METRICS}
        return out
    draws = np.random.default_rng(seed).integers(0, n_groups, size=(resamples, n_groups))
    weights = np.zeros((resamples, n_groups))
    np.add.at(weights, (np.repeat(np.arange(resamples), n_groups), draws.ravel()), 1)
    values = summary_from_confusion((weights @ per_group).reshape(resamples, n_classes, n_classes))
    alpha = (1 - level) / 2
    ci = {}
    for m in BOOTSTRAP_METRICS:
        v = values[m][np.isfinite(values[m])]
        ci[m] = [float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))] if len(v) else None
    out["ci95"] = ci
    return out


def metrics_by_group(y: np.ndarray, proba: np.ndarray, groups: np.ndarray, paths: np.ndarray, classes: list[str],
                     *, seed: int = 0) -> dict:
    """Group-level metrics (one row per group, intervals resample groups) and image-level metrics with a
    cluster bootstrap, for one split's rows."""
    frame = group_predictions(proba, groups, paths, classes, y)
    index = {c: i for i, c in enumerate(classes)}
    y_group = frame["label"].map(index).to_numpy(np.int64)
    proba_group = frame[[f"prob_{c}" for c in classes]].to_numpy(np.float64)
    group_level = classification_metrics(y_group, proba_group, classes, seed=seed)
    keys = group_keys(groups, paths)
    return {"groups": len(frame), "mixed_label_groups": int(frame["mixed_labels"].sum()),
            "group_level": group_level,
            "image_level_cluster_bootstrap": cluster_bootstrap(y, np.asarray(proba).argmax(axis=1), keys,
                                                               len(classes), seed=seed)}


def per_group_results(ds, proba: np.ndarray, split: dict[str, np.ndarray], *, seed: int = 0) -> dict:
    """For a training run: ``metrics`` per held-out split (validation, test) and ``table``, the per-group
    predictions of every split's groups with a ``split`` column."""
    import pandas as pd

    from stage2_classify.data.split import SPLITS

    metrics, tables = {}, []
    for name in SPLITS:
        idx = split.get(name, np.zeros(0, np.int64))
        if not len(idx):
            continue
        if name != "train":
            metrics[name] = metrics_by_group(ds.y[idx], proba[idx], ds.groups[idx], ds.paths[idx], ds.classes,
                                             seed=seed)
        frame = group_predictions(proba[idx], ds.groups[idx], ds.paths[idx], ds.classes, ds.y[idx])
        frame.insert(1, "split", name)
        tables.append(frame)
    return {"metrics": metrics, "table": pd.concat(tables, ignore_index=True) if tables else None}


def write_group_predictions(frame, path) -> None:
    """``group_predictions.parquet`` (the caller's writer makes the whole run atomic)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if frame is not None:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, compression="zstd")


def format_group_metrics(by_group: dict | None) -> list[str]:
    """Summary lines: per held-out split, the group-level scores with intervals that resample groups."""
    if not by_group:
        return []
    lines = []
    for name, m in by_group.items():
        g = m["group_level"]
        ci = g.get("ci95") or {}

        def fmt(key, label):
            value, interval = g.get(key), ci.get(key)
            return (f"{label} {'-' if value is None else format(value, '.3f')}"
                    + (f" [{interval[0]:.3f}–{interval[1]:.3f}]" if interval else ""))
        mixed = f", {m['mixed_label_groups']} with mixed labels" if m["mixed_label_groups"] else ""
        lines.append(f"  per group  {name}: {m['groups']} groups{mixed}; {fmt('accuracy', 'accuracy')}  "
                     f"{fmt('balanced_accuracy', 'balanced')}  {fmt('macro_f1', 'macro-F1')} (mean probability "
                     "over each group's images; intervals resample groups)")
    return lines


def predictions_by_group(frame, *, groups=None, group_regex: str | None = None):
    """Per-group predictions from a prediction table (``predict(..., all_probabilities=True)``): one row per
    group with the mean of its images' probabilities, as :func:`group_predictions` gives.

    ``groups``: a mapping path → group or a sequence aligned with the rows; ``group_regex``: a regex with one
    capture group searched in each path (as stage 1's ``--group-regex``). Rows that could not be predicted
    (an ``error``) are left out; ungrouped rows are groups of one.
    """
    from stage2_classify.data.groups import groups_for

    columns = [c for c in frame.columns if str(c).startswith("prob_")]
    if not columns:
        raise ValueError("the prediction table has no prob_<class> columns: predict with all_probabilities=True "
                         "(CLI: --all-probabilities)")
    usable = frame["predicted"].notna().to_numpy() if "predicted" in frame.columns else np.ones(len(frame), bool)
    paths = frame["path"].astype(str).to_numpy()
    if isinstance(groups, dict):
        current = np.array([groups.get(p) for p in paths], dtype=object)
    elif groups is not None:
        current = np.asarray(list(groups), dtype=object)
        if len(current) != len(frame):
            raise ValueError(f"groups has {len(current)} entries for {len(frame)} prediction rows")
    else:
        current = np.full(len(frame), None, dtype=object)
    current = groups_for(paths, current, group_regex=group_regex)
    proba = frame[columns].to_numpy(np.float64)
    classes = [str(c)[len("prob_"):] for c in columns]
    return group_predictions(proba[usable], current[usable], paths[usable], classes)
