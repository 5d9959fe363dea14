"""The data doctor: likely-mislabelled images, duplicates and split leakage, outliers, and an HTML report.

Everything is computed from the cached vectors and content ids; images are only opened for the report's
thumbnails. Outputs in ``out``: ``label_issues.csv``, ``duplicates.csv``, ``outliers.csv``, ``doctor.json``
and ``report.html``, each written atomically. The checks themselves are in ``stage2_classify.quality``.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import shardformat
from shardformat.layout import read_run_summary
from stage2_classify.data import DatasetError, labelled_mask
from stage2_classify.neighbours import nearest_neighbours, normalise
from stage2_classify import quality

FILES = ("label_issues.csv", "duplicates.csv", "outliers.csv", "doctor.json", "report.html")


class DoctorError(DatasetError):
    """The doctor cannot run on these inputs as given (no shards, an out-of-fold file that does not match, …)."""


@dataclasses.dataclass
class DoctorResult:
    out: Path
    label_issues: pd.DataFrame  # path, label, suggested_label, score (most suspicious first)
    duplicates: pd.DataFrame  # path_a, path_b, kind, similarity, label_a, label_b, split_a, split_b, …
    outliers: pd.DataFrame  # path, label, score, neighbour_distance, class_distance
    summary: dict  # the contents of doctor.json
    report: Path | None

    def format(self) -> str:
        c = self.summary["counts"]
        lines = [f"doctor done: {self.out}",
                 f"  rows            {c['rows']} ({c['labelled']} labelled, {c['classes']} classes)",
                 f"  label issues    {c['label_issues']} of {c['scored']} scored rows",
                 f"  exact dups      {c['exact_groups']} groups ({c['exact_conflicting_groups']} with conflicting "
                 f"labels), {c['exact_pairs']} pairs",
                 f"  near dups       {c['near_pairs']} pairs at cosine >= {self.summary['thresholds']['near']} "
                 f"({c['near_label_conflicts']} with different labels)",
                 f"  leakage         {c['leak_pairs']} duplicate pairs across splits"
                 + f" ({self.summary['splits']['source'] if self.summary['splits']['known'] else 'splits unknown'})",
                 f"  outliers        {c['outliers']}"]
        lines += [f"  note            {n}" for n in self.summary["notes"]]
        if self.report:
            lines.append(f"  report          {self.report}")
        return "\n".join(lines)


def doctor(shards: str | os.PathLike, out: str | os.PathLike, *, images: str | os.PathLike | None = None,
           oof: pd.DataFrame | str | os.PathLike | None = None, run: str | os.PathLike | None = None,
           split_file: str | os.PathLike | None = None, near_threshold: float = quality.NEAR_THRESHOLD,
           neighbours: int = quality.NEIGHBOURS, outlier_z: float = quality.OUTLIER_Z, folds: int = 5,
           seed: int = 0, backend: str = "auto", report: bool = True, progress: bool = False) -> DoctorResult:
    """Check the labelled feature shards in ``shards`` and write the findings into ``out``.

    ``oof``: out-of-fold probabilities (a DataFrame, or a Parquet/CSV file with ``path`` and ``prob_<class>``
    columns); without it they are computed with ``stage2_classify.cv.cross_validate(folds, seed)``.
    Splits for the leakage check come from ``run`` (a training run's ``split.csv``/``split.json``) or
    ``split_file`` (columns ``path,split``), else from the content-keyed split ``train`` makes with ``seed``.
    ``images``: where the image files are, for the report's thumbnails (default: the root stage 1 recorded
    in its run summary, ``OUT.meta/run.json``).
    """
    if not 0 < near_threshold <= 1:
        raise ValueError(f"near_threshold is a cosine similarity in (0, 1], not {near_threshold}")
    if neighbours < 1:
        raise ValueError(f"neighbours must be at least 1, not {neighbours}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    fs = shardformat.read_features(shards)
    if len(fs) == 0:
        raise DoctorError(f"{os.fspath(shards)}: no feature shards (part-*.parquet) found; "
                          f"run stage1-extract --out {os.fspath(shards)} first")
    paths = fs.paths.astype(str)
    has_label = labelled_mask(fs.labels)
    labels = np.where(has_label, fs.labels, "").astype(object)
    content_ids = fs.content_ids.astype(str)
    classes = sorted(set(labels[has_label]))
    y = np.full(len(fs), -1, np.int64)
    y[has_label] = np.searchsorted(classes, labels[has_label].astype(str))
    notes: list[str] = []
    timings["load"] = time.perf_counter() - t0

    t = time.perf_counter()
    splits, split_source = _splits(paths, content_ids, labels, fs.groups, run, split_file, seed, notes)
    timings["splits"] = time.perf_counter() - t

    t = time.perf_counter()
    unit = normalise(fs.features)
    nb = nearest_neighbours(unit, neighbours, backend=backend, normalised=True)
    timings["neighbours"] = time.perf_counter() - t

    t = time.perf_counter()
    exact, exact_stats = quality.exact_duplicates(content_ids, paths, labels, splits)
    near = quality.near_duplicates(nb, near_threshold, content_ids, paths, labels, splits)
    duplicates = pd.concat([exact, near], ignore_index=True) if len(near) else exact
    scores = quality.outlier_scores(unit, nb, y, content_ids)
    flagged = np.flatnonzero(scores["score"] >= outlier_z)
    outliers = pd.DataFrame({"path": paths[flagged], "label": labels[flagged], "score": scores["score"][flagged],
                             "neighbour_distance": scores["neighbour_distance"][flagged],
                             "class_distance": scores["class_distance"][flagged]})
    outliers = outliers.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    timings["duplicates_outliers"] = time.perf_counter() - t

    t = time.perf_counter()
    probs, oof_classes, oof_source = _oof_probabilities(shards, oof, paths, labels, has_label, folds, seed,
                                                        progress, notes)
    scored = np.flatnonzero(np.isfinite(probs).all(axis=1) & np.isin(labels, oof_classes))
    y_oof = np.searchsorted(oof_classes, labels[scored].astype(str)) if len(scored) else np.zeros(0, np.int64)
    with warnings.catch_warnings(record=True) as caught:  # cleanlab's warnings (e.g. tiny classes) become notes
        warnings.simplefilter("always")
        issues = quality.label_issues(paths[scored], y_oof, probs[scored], oof_classes)
    notes += sorted({f"cleanlab: {w.message}" for w in caught if issubclass(w.category, UserWarning)})
    timings["label_issues"] = time.perf_counter() - t

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "shards": os.fspath(shards), "backbone": fs.metadata.backbone if fs.metadata else None,
        "counts": {
            "rows": int(len(fs)), "labelled": int(has_label.sum()), "classes": len(classes),
            "scored": int(len(scored)), "label_issues": int(len(issues)),
            "exact_groups": exact_stats["groups"], "exact_conflicting_groups": exact_stats["conflicting_groups"],
            "exact_files": exact_stats["files"], "exact_pairs": int(len(exact)),
            "near_pairs": int(len(near)), "near_label_conflicts": int(near["label_conflict"].sum()),
            "leak_pairs": int(duplicates["leak"].sum()), "outliers": int(len(outliers)),
        },
        "thresholds": {"near": near_threshold, "neighbours": neighbours, "outlier_z": outlier_z},
        "method": {"label_issues": quality.LABEL_METHOD, "out_of_fold": oof_source,
                   "exact_duplicates": "same content_id (size + BLAKE2b-128 of the file bytes)",
                   "near_duplicates": f"cosine similarity of the feature vectors >= {near_threshold} among each "
                                      f"image's {neighbours} nearest neighbours ({nb.backend} search)",
                   "outliers": quality.OUTLIER_METHOD},
        "splits": {"known": bool((splits != "").any()), "source": split_source},
        "classes": classes, "notes": notes,
    }
    _write_csv(issues, out / "label_issues.csv")
    _write_csv(duplicates, out / "duplicates.csv")
    _write_csv(outliers, out / "outliers.csv")
    report_path = None
    if not report and (out / "report.html").exists():
        (out / "report.html").unlink()  # a report from an earlier run would contradict the new files
    if report:
        from stage2_classify.doctor_report import write_doctor_report

        t = time.perf_counter()
        context = dict(unit=unit, paths=paths, labels=labels, probs=probs, oof_classes=oof_classes, scores=scores,
                       images=_images_root(shards, images, notes), seed=seed)
        report_path = write_doctor_report(out / "report.html", summary, issues, duplicates, outliers, context)
        timings["report"] = time.perf_counter() - t
    summary["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    shardformat.atomic_write_json(out / "doctor.json", summary)
    return DoctorResult(out, issues, duplicates, outliers, summary, report_path)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    shardformat.atomic_write_via_path(path, lambda tmp: frame.to_csv(tmp, index=False, float_format="%.6g"))


def _splits(paths, content_ids, labels, groups, run, split_file, seed, notes) -> tuple[np.ndarray, str]:
    """Each row's split name (train / validation / test), or "" where unknown, and where they came from.

    A run's ``split.csv`` (``split.json`` for older runs) or a split file is matched by path first, then by
    content id, so two copies the file put in different splits show up as a leak. Without either, the split
    ``train`` would make by default (keyed by content, so exact copies share a split) is checked.
    """
    from stage2_classify.splitfile import read_split_file

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
    from stage2_classify.split import content_split
    from stage2_classify.train import TrainOptions

    labelled = np.flatnonzero(labels != "")
    defaults = TrainOptions(seed=seed)
    parts = content_split(content_ids[labelled], labels[labelled].astype(str), groups[labelled],
                          val_fraction=defaults.val_fraction, test_fraction=defaults.test_fraction, seed=seed)
    for name, rows in parts.items():
        splits[labelled[rows]] = name
    return splits, f"train's default content-keyed split, seed {seed}"


def _oof_probabilities(shards, oof, paths, labels, has_label, folds, seed, progress, notes):
    """(n, k) out-of-fold probabilities aligned to the shard rows (NaN where missing), the classes, a source."""
    if oof is None:
        from stage2_classify.cv import cross_validate

        if len(set(labels[has_label])) < 2:  # duplicates and outliers still make sense without labels
            notes.append("label issues not checked: they need labelled images of at least two classes")
            return np.full((len(paths), 0), np.nan), [], "none"
        result = cross_validate(shards, folds=folds, seed=seed, progress=progress)
        frame, classes, source = result.oof, list(result.classes), f"{folds}-fold cross-validation, seed {seed}"
    else:
        source = "given DataFrame" if isinstance(oof, pd.DataFrame) else os.fspath(oof)
        frame = oof if isinstance(oof, pd.DataFrame) else _read_table(oof)
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


def _read_table(path) -> pd.DataFrame:
    text = os.fspath(path)
    try:
        if text.lower().endswith((".parquet", ".pq")):
            return pd.read_parquet(text)
        return pd.read_csv(text)
    except (OSError, ValueError) as exc:
        raise DoctorError(f"{text}: cannot read out-of-fold probabilities ({exc})") from None


def _images_root(shards, images, notes) -> str | None:
    """Where thumbnails are read from: ``images``, else the root stage 1 recorded in its run summary."""
    if images is not None:
        return os.fspath(images)
    recorded = read_run_summary(shards).get("images_root")
    if not recorded:
        notes.append("no image root (pass --images ROOT): the report shows no thumbnails")
    return recorded
