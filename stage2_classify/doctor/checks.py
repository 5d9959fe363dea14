"""The doctor's checks, each a pure function of arrays: label issues, exact and near duplicates, outliers.

``doctor/examine.py`` loads the shards, gathers the inputs (out-of-fold probabilities, splits, neighbours)
and writes the files; everything that decides what is flagged lives here, vectorised over rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from stage2_classify.options import DoctorOptions

if TYPE_CHECKING:  # pandas is imported where used, so the CLI's --help (which reads the defaults here) stays fast
    import pandas as pd

    from stage2_classify.doctor.neighbours import Neighbours

# The thresholds are defined (and explained) once, as DoctorOptions' defaults.
NEAR_THRESHOLD = DoctorOptions.near_threshold
NEIGHBOURS = DoctorOptions.neighbours
OUTLIER_Z = DoctorOptions.outlier_z
LABEL_METHOD = ("cleanlab confident learning: cleanlab.filter.find_label_issues(filter_by='prune_by_noise_rate') "
                "on out-of-fold predicted probabilities flags rows whose given label disagrees with a class the "
                "out-of-fold model is confident about (per-class thresholds = mean self-confidence); "
                "score = 1 - out-of-fold probability of the given label (cleanlab.rank self_confidence); "
                "suggested label = argmax of the out-of-fold probabilities")
OUTLIER_METHOD = ("score = min(robust z of the mean cosine distance to the k nearest other images, robust z of the "
                  "cosine distance to the image's own class centroid, z per class); flagged when the score is at "
                  "least the threshold; unlabelled images use the neighbour distance alone")

DUPLICATE_COLUMNS = ["path_a", "path_b", "kind", "similarity", "label_a", "label_b", "split_a", "split_b",
                     "label_conflict", "leak"]


def label_issues(paths: np.ndarray, y: np.ndarray, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Rows cleanlab's confident learning flags, most suspicious first: path, label, suggested_label, score.

    ``y`` holds class indices into ``classes`` and ``probs`` the (n, k) out-of-fold probabilities.
    """
    import pandas as pd

    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    columns = ["path", "label", "suggested_label", "score"]
    if len(y) == 0:
        return pd.DataFrame(columns=columns)
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    quality = get_label_quality_scores(y, probs, method="self_confidence")
    flagged = find_label_issues(y, probs, filter_by="prune_by_noise_rate", n_jobs=1)
    names = np.asarray(classes, dtype=object)
    frame = pd.DataFrame({"path": paths[flagged], "label": names[y[flagged]],
                          "suggested_label": names[probs[flagged].argmax(axis=1)],
                          "score": 1.0 - quality[flagged]})
    return frame.sort_values(["score", "path"], ascending=[False, True], kind="stable").reset_index(drop=True)


def _pairs_frame(a: np.ndarray, b: np.ndarray, kind: str, similarity: np.ndarray, paths, labels, splits):
    import pandas as pd

    la, lb, sa, sb = labels[a], labels[b], splits[a], splits[b]
    return pd.DataFrame({
        "path_a": paths[a], "path_b": paths[b], "kind": kind, "similarity": similarity.astype(np.float64),
        "label_a": la, "label_b": lb, "split_a": sa, "split_b": sb,
        "label_conflict": (la != lb) & (la != "") & (lb != ""),
        "leak": (sa != sb) & (sa != "") & (sb != ""),
    }, columns=DUPLICATE_COLUMNS)


def exact_duplicates(content_ids: np.ndarray, paths: np.ndarray, labels: np.ndarray,
                     splits: np.ndarray) -> tuple[pd.DataFrame, dict]:
    """Files with the same bytes (same ``content_id``): every member paired with its group's first path.

    Groups whose labels disagree come first. Returns the pairs and counts (groups, conflicting groups, files).
    """
    import pandas as pd

    _, codes, counts = np.unique(content_ids.astype(str), return_inverse=True, return_counts=True)
    codes = codes.reshape(-1)
    in_group = counts[codes] > 1
    rows = np.flatnonzero(in_group)
    rows = rows[np.lexsort((paths[rows].astype(str), codes[rows]))]  # by group, then path
    first = np.r_[True, codes[rows][1:] != codes[rows][:-1]] if len(rows) else np.zeros(0, bool)
    head = rows[first][np.cumsum(first) - 1]  # each row's group representative
    members = ~first
    frame = _pairs_frame(head[members], rows[members], "exact", np.ones(int(members.sum())), paths, labels, splits)
    labelled = labels[rows] != ""
    group_labels = (pd.DataFrame({"g": codes[rows][labelled], "label": labels[rows][labelled]})
                    .groupby("g")["label"].nunique())
    conflicting = set(group_labels.index[group_labels > 1])
    frame["_conflict_group"] = [codes[r] in conflicting for r in rows[members]]
    frame = frame.sort_values(["_conflict_group", "leak", "path_a", "path_b"],
                              ascending=[False, False, True, True], kind="stable").drop(columns="_conflict_group")
    stats = {"groups": int(first.sum()), "conflicting_groups": len(conflicting), "files": int(len(rows))}
    return frame.reset_index(drop=True), stats


def near_duplicates(nb: Neighbours, threshold: float, content_ids: np.ndarray, paths: np.ndarray,
                    labels: np.ndarray, splits: np.ndarray) -> pd.DataFrame:
    """Pairs of different files at cosine similarity >= ``threshold`` in the neighbour graph, once each.

    Reading pairs from the k-nearest-neighbour graph bounds the list at k pairs per image, so a folder of
    near-identical frames cannot flood it; byte-identical pairs are left to :func:`exact_duplicates`.
    """
    n, k = nb.indices.shape
    i = np.repeat(np.arange(n, dtype=np.int64), k)
    j = nb.indices.reshape(-1)
    s = nb.similarities.reshape(-1)
    keep = (j >= 0) & (s >= threshold)
    i, j, s = i[keep], j[keep], s[keep]
    a, b = np.minimum(i, j), np.maximum(i, j)
    key = a * n + b
    order = np.lexsort((-s, key))  # per pair, the higher of the two (rounding-different) scores first
    key, a, b, s = key[order], a[order], b[order], s[order]
    first = np.r_[True, key[1:] != key[:-1]] if len(key) else np.zeros(0, bool)
    a, b, s = a[first], b[first], s[first]
    distinct = content_ids[a] != content_ids[b]
    frame = _pairs_frame(a[distinct], b[distinct], "near", np.minimum(s[distinct], 1.0), paths, labels, splits)
    return frame.sort_values(["label_conflict", "leak", "similarity", "path_a"],
                             ascending=[False, False, False, True], kind="stable").reset_index(drop=True)


def robust_z(values: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 MAD); a zero MAD falls back to the standard deviation, then to 1."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return values
    median = np.median(values)
    scale = 1.4826 * np.median(np.abs(values - median))
    if not scale > 0:
        scale = values.std() or 1.0
    return (values - median) / scale


def outlier_scores(unit: np.ndarray, nb: Neighbours, y: np.ndarray, content_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Per row: ``neighbour_distance``, ``class_distance`` (NaN when unlabelled, ``y`` < 0) and ``score``.

    Neighbours with the same bytes are ignored, so a pair of duplicated oddities still stands out.
    """
    _, codes = np.unique(content_ids.astype(str), return_inverse=True)
    codes = codes.reshape(-1)
    valid = nb.indices >= 0
    valid &= codes[np.where(valid, nb.indices, 0)] != codes[:, None]
    with np.errstate(invalid="ignore"):
        knn = np.where(valid, nb.similarities, 0.0).sum(axis=1) / np.maximum(valid.sum(axis=1), 1)
    neighbour_distance = np.where(valid.any(axis=1), 1.0 - knn, np.nan)
    z_knn = np.full(len(unit), np.nan)
    finite = np.isfinite(neighbour_distance)
    z_knn[finite] = robust_z(neighbour_distance[finite])

    labelled = y >= 0
    class_distance = np.full(len(unit), np.nan)
    z_class = np.full(len(unit), np.nan)
    if labelled.any():
        idx = np.flatnonzero(labelled)
        by_class = idx[np.argsort(y[idx], kind="stable")]
        present, starts = np.unique(y[by_class], return_index=True)
        sums = np.zeros((int(present.max()) + 1, unit.shape[1]), np.float64)
        sums[present] = np.add.reduceat(unit[by_class], starts, axis=0, dtype=np.float64)  # one pass, no add.at
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        centroids = np.divide(sums, norms, out=np.zeros_like(sums), where=norms > 0).astype(np.float32)
        class_distance[idx] = 1.0 - np.einsum("ij,ij->i", unit[idx], centroids[y[idx]])
        z_class[idx] = robust_z(class_distance[idx])  # kept by classes too small to have a spread of their own
        for members in np.split(by_class, starts[1:]):
            if len(members) >= 10:
                z_class[members] = robust_z(class_distance[members])
    score = np.fmin(z_knn, z_class)  # fmin ignores a NaN side: unlabelled rows keep the neighbour score
    return {"neighbour_distance": neighbour_distance, "class_distance": class_distance, "score": score}
