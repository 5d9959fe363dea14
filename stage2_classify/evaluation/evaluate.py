"""``evaluate()``: metrics of a trained run on labelled shards, and whether those images are really held out.

Images the run trained or validated on are found by content (then path) in the run's ``split.csv``; the
metrics then carry ``overlap`` counts and a warning, because they are not a held-out estimate.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

import shardformat
from hybrid_common import renamed_keywords
from stage2_classify.data.dataset import labelled_mask
from stage2_classify.errors import DatasetError
from stage2_classify.finetuning.provenance import seen_by_backbone
from stage2_classify.runs.load import LoadedRun, load_run


def _read(shards, run: LoadedRun) -> shardformat.FeatureSet:
    """The shards' vectors, refused unless made like the ones the model was trained on."""
    fs = shardformat.read_features(shards, expect=run.metadata)
    if len(fs) == 0 or fs.metadata is None:
        raise DatasetError(f"{os.fspath(shards)}: no feature shards (part-*.parquet) found; "
                           f"run stage1-extract --out {os.fspath(shards)} first")
    return fs


def _probabilities(run: LoadedRun, features: np.ndarray) -> np.ndarray:
    from stage2_classify.training.fit import predict_proba

    return predict_proba(run.model, features)


def _groups(run: LoadedRun, paths, current, group_regex, groups):
    """The evaluated rows' groups (given options, else the run's regrouping options, else the shards'), or
    None when no row has one."""
    from stage2_classify.data.groups import groups_for

    if group_regex is None and groups is None:
        config = shardformat.read_json(Path(run.path) / "config.json", default={})
        config = config if isinstance(config, dict) else {}
        group_regex, groups = config.get("group_regex"), config.get("groups")
    found = groups_for(paths, current, group_regex=group_regex, groups=groups)
    has = np.array([g is not None and g == g and g != "" for g in found], dtype=bool)
    return found if has.any() else None


@dataclasses.dataclass
class EvaluationResult:
    """Metrics of a run on labelled shards, and whether those shards overlap what the model learned from."""

    shards: str
    run_dir: str
    metrics: dict  # see stage2_classify.evaluation.metrics.classification_metrics, plus the counts and "overlap" below

    @property
    def overlap(self) -> dict:
        return self.metrics.get("overlap", {})

    @property
    def held_out(self) -> bool:
        """False when any evaluated image was in the model's training or validation split."""
        return not (self.overlap.get("train") or self.overlap.get("validation")
                    or self.overlap.get("finetuned_backbone"))

    def format(self) -> str:
        from stage2_classify.evaluation.metrics import format_metric

        m = self.metrics
        lines = [f"evaluated {m['n']} rows of {self.shards} with {self.run_dir}:",
                 "  " + "  ".join(format_metric(m, k, label) for k, label in (
                     ("accuracy", None), ("balanced_accuracy", "balanced"), ("macro_f1", "macro-F1")))]
        extra = [f"{label} {m[k]:.3f}" for k, label in (("roc_auc_ovr", "ROC AUC"), ("log_loss", "log-loss"),
                                                        ("ece", "ECE")) if m.get(k) is not None]
        if m.get("majority_rate") is not None:
            extra.append(f"majority-class rate {m['majority_rate']:.3f}")
        lines.append("  " + "  ".join(extra))
        if m.get("unlabelled_rows"):
            lines.append(f"  {m['unlabelled_rows']} unlabelled rows skipped")
        if m.get("unknown_labels"):
            lines.append(f"  {m['unknown_label_rows']} rows with labels unknown to the model skipped: "
                         f"{m['unknown_labels'][:10]}")
        if m.get("warning"):
            lines.append(f"  WARNING: {m['warning']}")
        if m.get("by_group"):
            from stage2_classify.evaluation.groups import format_group_metrics

            lines += format_group_metrics({"evaluated": m["by_group"]})
        return "\n".join(lines)


def _overlap(run_path: Path, content_ids: np.ndarray, paths: np.ndarray) -> dict[str, int]:
    """How many evaluated rows were in the run's train / validation / test split, by content (then path)."""
    from stage2_classify.data.splitfile import read_split_file

    for name in ("split.csv", "split.json"):
        if (run_path / name).is_file():
            table = read_split_file(run_path / name)
            break
    else:
        return {}
    out = {}
    for split in ("train", "validation", "test"):
        rows = [i for i, s in enumerate(table.column("split").to_pylist()) if s == split]
        cids = {c for c in table.column("content_id").take(rows).to_pylist() if c is not None}
        known_paths = {p for p in table.column("path").take(rows).to_pylist() if p is not None}
        hit = np.isin(content_ids.astype(str), np.asarray(sorted(cids), dtype=str)) if cids else np.zeros(len(paths), bool)
        if known_paths and not cids:  # an old split.json: paths only
            hit |= np.isin(paths.astype(str), np.asarray(sorted(known_paths), dtype=str))
        out[split] = int(hit.sum())
    return out


@renamed_keywords(shards="features", features_dir="features", model="run", model_dir="run", run_dir="run")
def evaluate(features: str | os.PathLike, run: str | os.PathLike, out: str | os.PathLike | None = None, *,
             group_regex: str | None = None, groups: str | os.PathLike | None = None,
             progress: bool = True) -> EvaluationResult:
    """Metrics of the trained ``run`` on every labelled row of the feature folder ``features`` (e.g. a held-out
    collection).

    Rows without a label, and rows whose label the model was not trained on, are counted and skipped. When
    some rows were in the model's training or validation split (same content), a warning is issued and the
    metrics carry ``overlap`` counts and a ``warning``: those numbers are not a held-out estimate. With
    ``out``, the metrics are also written there as JSON. ``progress`` prints the summary.

    With groups (the shards' own, ``group_regex`` / ``groups`` given here, else the run's own regrouping
    options from its ``config.json``), the metrics also hold ``by_group``: one prediction per group (the mean
    of its images' probabilities) and group-level metrics whose intervals resample groups
    (``evaluation/groups.py``).
    """
    shards = features
    import warnings

    from stage2_classify.evaluation.metrics import classification_metrics, majority_rate

    run = load_run(run)
    fs = _read(shards, run)
    has_label = labelled_mask(fs.labels)
    labels = fs.labels[has_label].astype(str)
    known = np.isin(labels, np.asarray(run.classes, dtype=str))
    unknown = sorted(set(np.unique(labels[~known]).tolist()))
    if not known.any():
        raise DatasetError(f"{os.fspath(shards)}: no rows carry a label the model knows "
                           f"({', '.join(run.classes[:10])}{', …' if len(run.classes) > 10 else ''})")
    order = np.argsort(np.asarray(run.classes, dtype=str))
    y = order[np.searchsorted(np.asarray(run.classes, dtype=str), labels[known], sorter=order)]
    rows = np.flatnonzero(has_label)[known]
    proba = _probabilities(run, fs.features[rows])
    report = classification_metrics(y, proba, run.classes)
    report["majority_rate"] = majority_rate(y)
    report["unlabelled_rows"] = int((~has_label).sum())
    report["unknown_labels"] = unknown
    report["unknown_label_rows"] = int((~known).sum())
    overlap = _overlap(run.path, fs.content_ids[rows], fs.paths[rows])
    report["overlap"] = overlap
    seen = overlap.get("train", 0) + overlap.get("validation", 0)
    tuned = seen_by_backbone(fs.metadata)  # vectors of a fine-tuned backbone: the images it learnt from
    if tuned:
        used = tuned["train"] | tuned["validation"]
        overlap["finetuned_backbone"] = int(sum(c in used for c in fs.content_ids[rows]))
    report["held_out"] = seen == 0 and not overlap.get("finetuned_backbone")
    if not seen and overlap.get("finetuned_backbone"):
        report["warning"] = (f"{overlap['finetuned_backbone']} of {len(rows)} evaluated images trained the fine-tuned "
                             f"backbone these vectors come from ({fs.metadata.provenance.get('directory')}): these "
                             "metrics are not a held-out estimate")
        warnings.warn(f"{os.fspath(shards)}: {report['warning']}", stacklevel=3)
    if seen:
        report["warning"] = (f"{seen} of {len(rows)} evaluated images were in the model's training "
                             f"({overlap.get('train', 0)}) or validation ({overlap.get('validation', 0)}) split: "
                             "these metrics are not a held-out estimate")
        warnings.warn(f"{os.fspath(shards)}: {report['warning']}", stacklevel=3)  # past renamed_keywords
    groups = _groups(run, fs.paths[rows], fs.groups[rows], group_regex, groups)
    if groups is not None:
        from stage2_classify.evaluation.groups import metrics_by_group

        report["by_group"] = metrics_by_group(y, proba, groups, fs.paths[rows], run.classes)
    result = EvaluationResult(os.fspath(shards), str(run.path), report)
    if out is not None:
        shardformat.atomic_write_json(out, report)
    if progress:
        print(result.format(), flush=True)
    return result
