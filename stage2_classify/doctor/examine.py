"""The data doctor: likely-mislabelled images, duplicates and split leakage, outliers, and an HTML report.

Everything is computed from the cached vectors and content ids; images are only opened for the report's
thumbnails. Outputs in ``out``: ``label_issues.csv``, ``duplicates.csv``, ``outliers.csv``, ``doctor.json``
and ``report.html``, each written atomically. :func:`doctor` runs in three steps: gather (load the shards,
find each row's split, the nearest neighbours and the out-of-fold probabilities; ``sources.py``), check (the
pure functions of ``checks.py``) and write (the files and the report).
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
from hybrid_common import renamed_keywords
from stage2_classify.data.dataset import labelled_mask
from stage2_classify.doctor import checks
from stage2_classify.doctor.neighbours import nearest_neighbours, normalise
from stage2_classify.doctor.sources import images_root, oof_probabilities, row_splits
from stage2_classify.errors import DoctorError
from stage2_classify.options import DoctorOptions, TrainOptions

FILES = ("label_issues.csv", "duplicates.csv", "outliers.csv", "doctor.json", "report.html")


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


@renamed_keywords(shards="features", features_dir="features")
def doctor(features: str | os.PathLike, out: str | os.PathLike, *, images: str | os.PathLike | None = None,
           oof: pd.DataFrame | str | os.PathLike | None = None, run: str | os.PathLike | None = None,
           split_file: str | os.PathLike | None = None, near_threshold: float = DoctorOptions.near_threshold,
           neighbours: int = DoctorOptions.neighbours, outlier_z: float = DoctorOptions.outlier_z,
           folds: int = DoctorOptions.folds, seed: int = TrainOptions.seed, backend: str = DoctorOptions.backend,
           report: bool = True, progress: bool = True) -> DoctorResult:
    """Check the labelled feature folder ``features`` and write the findings into ``out``.

    ``oof``: out-of-fold probabilities (a DataFrame, or a Parquet/CSV file with ``path`` and ``prob_<class>``
    columns); without it they are computed with ``stage2_classify.cross_validate(folds, seed)``.
    Splits for the leakage check come from ``run`` (a training run's ``split.csv``/``split.json``) or
    ``split_file`` (columns ``path,split``), else from the content-keyed split ``train`` makes with ``seed``.
    ``images``: where the image files are, for the report's thumbnails (default: the root stage 1 recorded
    in its run summary, ``OUT.meta/run.json``). ``progress``: the cross-validation's lines.
    """
    if not 0 < near_threshold <= 1:
        raise ValueError(f"near_threshold is a cosine similarity in (0, 1], not {near_threshold}")
    if neighbours < 1:
        raise ValueError(f"neighbours must be at least 1, not {neighbours}")
    timings: dict[str, float] = {}
    rows = _gather(features, run, split_file, neighbours, backend, seed, timings)
    found = _check(rows, features, oof, near_threshold, outlier_z, folds, seed, progress, timings)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    summary = _summary(features, rows, found, near_threshold, neighbours, outlier_z)
    report_path = None
    if not report and (out / "report.html").exists():
        (out / "report.html").unlink()  # a report from an earlier run would contradict the new files
    _write_csv(found["issues"], out / "label_issues.csv")
    _write_csv(found["duplicates"], out / "duplicates.csv")
    _write_csv(found["outliers"], out / "outliers.csv")
    if report:
        from stage2_classify.reports.doctor_report import write_doctor_report

        t = time.perf_counter()
        context = dict(unit=rows["unit"], paths=rows["paths"], labels=rows["labels"], probs=found["probs"],
                       oof_classes=found["oof_classes"], scores=found["scores"],
                       images=images_root(features, images, rows["notes"]), seed=seed, run=run)
        report_path = write_doctor_report(out / "report.html", summary, found["issues"], found["duplicates"],
                                          found["outliers"], context)
        timings["report"] = time.perf_counter() - t
    summary["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    shardformat.atomic_write_json(out / "doctor.json", summary)
    return DoctorResult(out, found["issues"], found["duplicates"], found["outliers"], summary, report_path)


def _gather(shards, run, split_file, neighbours: int, backend: str, seed: int, timings: dict) -> dict:
    """The shard rows, their labels and splits, and the nearest-neighbour graph of their unit vectors."""
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
    splits, split_source = row_splits(paths, content_ids, labels, fs.groups, run, split_file, seed, notes)
    timings["splits"] = time.perf_counter() - t

    t = time.perf_counter()
    unit = normalise(fs.features)
    nb = nearest_neighbours(unit, neighbours, backend=backend, normalised=True)
    timings["neighbours"] = time.perf_counter() - t
    return dict(fs=fs, paths=paths, has_label=has_label, labels=labels, content_ids=content_ids, classes=classes,
                y=y, notes=notes, splits=splits, split_source=split_source, unit=unit, nb=nb)


def _check(rows: dict, shards, oof, near_threshold: float, outlier_z: float, folds: int, seed: int,
           progress: bool, timings: dict) -> dict:
    """Duplicates (exact and near), outliers and label issues of the gathered rows."""
    paths, labels, content_ids, splits = rows["paths"], rows["labels"], rows["content_ids"], rows["splits"]
    t = time.perf_counter()
    exact, exact_stats = checks.exact_duplicates(content_ids, paths, labels, splits)
    near = checks.near_duplicates(rows["nb"], near_threshold, content_ids, paths, labels, splits)
    duplicates = pd.concat([exact, near], ignore_index=True) if len(near) else exact
    scores = checks.outlier_scores(rows["unit"], rows["nb"], rows["y"], content_ids)
    flagged = np.flatnonzero(scores["score"] >= outlier_z)
    outliers = pd.DataFrame({"path": paths[flagged], "label": labels[flagged], "score": scores["score"][flagged],
                             "neighbour_distance": scores["neighbour_distance"][flagged],
                             "class_distance": scores["class_distance"][flagged]})
    outliers = outliers.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    timings["duplicates_outliers"] = time.perf_counter() - t

    t = time.perf_counter()
    notes = rows["notes"]
    probs, oof_classes, oof_source = oof_probabilities(shards, oof, paths, labels, rows["has_label"], folds, seed,
                                                       progress, notes)
    scored = np.flatnonzero(np.isfinite(probs).all(axis=1) & np.isin(labels, oof_classes))
    y_oof = np.searchsorted(oof_classes, labels[scored].astype(str)) if len(scored) else np.zeros(0, np.int64)
    with warnings.catch_warnings(record=True) as caught:  # cleanlab's warnings (e.g. tiny classes) become notes
        warnings.simplefilter("always")
        issues = checks.label_issues(paths[scored], y_oof, probs[scored], oof_classes)
    notes += sorted({f"cleanlab: {w.message}" for w in caught if issubclass(w.category, UserWarning)})
    timings["label_issues"] = time.perf_counter() - t
    return dict(exact=exact, exact_stats=exact_stats, near=near, duplicates=duplicates, scores=scores,
                outliers=outliers, probs=probs, oof_classes=oof_classes, oof_source=oof_source, scored=scored,
                issues=issues)


def _summary(shards, rows: dict, found: dict, near_threshold: float, neighbours: int, outlier_z: float) -> dict:
    """The contents of ``doctor.json`` (without the timings, added last)."""
    fs, has_label, exact_stats, near = rows["fs"], rows["has_label"], found["exact_stats"], found["near"]
    return {
        "shards": os.fspath(shards), "backbone": fs.metadata.backbone if fs.metadata else None,
        "counts": {
            "rows": int(len(fs)), "labelled": int(has_label.sum()), "classes": len(rows["classes"]),
            "scored": int(len(found["scored"])), "label_issues": int(len(found["issues"])),
            "exact_groups": exact_stats["groups"], "exact_conflicting_groups": exact_stats["conflicting_groups"],
            "exact_files": exact_stats["files"], "exact_pairs": int(len(found["exact"])),
            "near_pairs": int(len(near)), "near_label_conflicts": int(near["label_conflict"].sum()),
            "leak_pairs": int(found["duplicates"]["leak"].sum()), "outliers": int(len(found["outliers"])),
        },
        "thresholds": {"near": near_threshold, "neighbours": neighbours, "outlier_z": outlier_z},
        "method": {"label_issues": checks.LABEL_METHOD, "out_of_fold": found["oof_source"],
                   "exact_duplicates": "same content_id (size + BLAKE2b-128 of the file bytes)",
                   "near_duplicates": f"cosine similarity of the feature vectors >= {near_threshold} among each "
                                      f"image's {neighbours} nearest neighbours ({rows['nb'].backend} search)",
                   "outliers": checks.OUTLIER_METHOD},
        "splits": {"known": bool((rows["splits"] != "").any()), "source": rows["split_source"]},
        "classes": rows["classes"], "notes": rows["notes"],
    }


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    shardformat.atomic_write_via_path(path, lambda tmp: frame.to_csv(tmp, index=False, float_format="%.6g"))
