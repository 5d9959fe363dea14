"""K-fold cross-validation on cached vectors: every labelled image predicted exactly once, out of fold.

Folds are stratified by class and group-aware: an image's unit (its group, else its content, merged across
shared content; see ``data/split.py``) never spans two folds, so exact duplicates and a patient's images are
always held out together (scikit-learn's ``StratifiedGroupKFold``; ``StratifiedKFold`` when every unit is
one image). Rows are in the canonical order of ``load_dataset`` and the fold shuffle is seeded, so the same
images and seed give the same folds whatever the shards' row order.

The default head is the one ``train`` fits, from the same definition (``training/heads.py``: ``auto``,
``linear`` or ``mlp``, chosen again inside each fold on a content-keyed 15% of the fold's training rows), so
the CV estimate is an estimate of the model ``train`` makes. ``head="fast-linear"`` is one logistic
regression with a fixed L2 (``training/linear.py``), seconds on 50,000 vectors where K choices of the
default head take minutes (``bench/cv.py``); the data doctor uses it. ``head="train"`` is the older
spelling of ``auto``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from typing import Sequence

import numpy as np

from hybrid_common import renamed_keywords
from shardformat import atomic_write_json
from stage2_classify.data.dataset import Dataset, load_dataset
from stage2_classify.errors import DatasetError
from stage2_classify.evaluation.metrics import classification_metrics
from stage2_classify.data.split import unit_keys
from stage2_classify.options import CV_HEADS, CVOptions, TrainOptions

SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_ovr", "log_loss", "ece")
HEADS = CV_HEADS  # older name
INNER_VALIDATION = 0.15  # share of a fold's training rows the head is chosen and early-stopped on


@dataclasses.dataclass
class CVResult:
    oof: object  # pandas DataFrame: path, content_id, label, fold, prob_<class>…; one row per labelled image
    classes: list[str]
    fold_metrics: list[dict]  # classification_metrics of each fold's held-out rows
    summary: dict  # metric → {"mean", "std", "ci95": [low, high]} across folds
    pooled: dict  # classification_metrics of all out-of-fold predictions together (bootstrap intervals)
    folds: int
    head: str
    seconds: float
    notes: list[str]
    out: str | None = None

    def format(self) -> str:
        lines = [f"cross-validation: {self.folds} folds, {len(self.oof)} images, {self.head} head, "
                 f"{self.seconds:.1f}s" + (f" → {self.out}" if self.out else "")]
        for name in SUMMARY_METRICS:
            s = self.summary.get(name)
            if s and s["mean"] is not None:
                ci = s["ci95"]
                lines.append(f"  {name.replace('_', ' '):18s} {s['mean']:.3f} ± {s['std']:.3f} across folds"
                             + (f"  (95% interval of the mean [{ci[0]:.3f}–{ci[1]:.3f}])" if ci else ""))
        lines += [f"  note  {n}" for n in self.notes]
        return "\n".join(lines)


def _fold_of_rows(ds: Dataset, folds: int, seed: int) -> tuple[np.ndarray, list[str]]:
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    units = unit_keys(ds.content_ids, ds.groups)
    _, unit_codes = np.unique(units.astype(str), return_inverse=True)
    n_units = int(unit_codes.max()) + 1
    if n_units < folds:
        raise DatasetError(f"{ds.source}: {n_units} distinct images (or groups) cannot fill {folds} folds")
    grouped = n_units < len(ds.y)
    splitter = (StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed) if grouped
                else StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed))
    fold = np.full(len(ds.y), -1, np.int64)
    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k, (_, held) in enumerate(splitter.split(ds.features[:, :1], ds.y, unit_codes if grouped else None)):
            fold[held] = k
    for w in caught:
        if "least populated class" in str(w.message):
            notes.append(f"{w.message} (such classes are missing from some folds)")
    counts = np.bincount(ds.y, minlength=len(ds.classes))
    small = [c for c, n in zip(ds.classes, counts) if n < folds]
    if small and not notes:
        notes.append(f"classes with fewer images than folds are missing from some folds: {', '.join(small[:5])}")
    return fold, notes


def _interval(values: list[float], bounded: bool = True) -> dict:
    """Mean, sample standard deviation and a t-based 95% interval of the mean across folds; ``bounded``
    metrics (every one but log-loss) have their interval clipped to [0, 1], where the metric lives."""
    from scipy.stats import t

    vals = np.asarray([v for v in values if v is not None], np.float64)
    if len(vals) == 0:
        return {"mean": None, "std": None, "ci95": None}
    mean = float(vals.mean())
    if len(vals) < 2:
        return {"mean": mean, "std": None, "ci95": None}
    std = float(vals.std(ddof=1))
    half = float(t.ppf(0.975, len(vals) - 1) * std / math.sqrt(len(vals)))
    low, high = mean - half, mean + half
    if bounded:
        low, high = max(low, 0.0), min(high, 1.0)
    return {"mean": mean, "std": std, "ci95": [low, high]}


@renamed_keywords(shards="features", shards_or_dataset="features")
def cross_validate(
    features: str | os.PathLike | Dataset,
    out: str | os.PathLike | None = None,
    *,
    folds: int = CVOptions.folds,
    seed: int = TrainOptions.seed,
    head: str = CVOptions.head,
    l2: float = CVOptions.l2,
    max_iter: int = CVOptions.max_iter,
    hidden: Sequence[int] = TrainOptions.hidden,
    dropout: float = TrainOptions.dropout,
    learning_rate: float = TrainOptions.learning_rate,
    epochs: int = TrainOptions.epochs,
    batch_size: int = TrainOptions.batch_size,
    weight_decay: float = TrainOptions.weight_decay,
    patience: int = TrainOptions.patience,
    class_weight: str = TrainOptions.class_weight,
    group_regex: str | None = TrainOptions.group_regex,
    groups: str | os.PathLike | None = TrainOptions.groups,
    progress: bool = True,
) -> CVResult:
    """Stratified, group-aware K-fold CV; returns out-of-fold probabilities for every labelled image.

    ``features``: a feature folder, or a :class:`~stage2_classify.Dataset` already loaded.

    ``head``: ``"auto"`` (default), ``"linear"`` or ``"mlp"``: the head ``train`` fits with these options
    (``hidden``, ``dropout``, …), chosen inside each fold; ``"fast-linear"``: multinomial logistic regression
    with L2 ``l2``, fitted by L-BFGS for at most ``max_iter`` steps; ``"train"``: older spelling of ``"auto"``.
    ``group_regex`` / ``groups`` regroup the rows first (``data/groups.py``); folds never divide a group.
    With ``out``, writes ``cv_metrics.json`` and ``oof_predictions.parquet`` there.
    """
    import pandas as pd

    from stage2_classify.training.fit import class_weights

    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    if head not in CV_HEADS:
        raise ValueError(f"head must be one of {', '.join(CV_HEADS)}, not {head!r}")
    head = "auto" if head == "train" else head
    opts = TrainOptions(head=head if head != "fast-linear" else "linear", hidden=hidden, dropout=dropout,
                        learning_rate=learning_rate, epochs=epochs, batch_size=batch_size,
                        weight_decay=weight_decay, patience=patience, seed=seed, class_weight=class_weight)
    from stage2_classify.data.groups import regroup

    ds = features if isinstance(features, Dataset) else load_dataset(features)
    ds = regroup(ds, group_regex=group_regex, groups=groups)
    t0 = time.perf_counter()
    fold, notes = _fold_of_rows(ds, folds, seed)
    k = len(ds.classes)
    proba = np.zeros((len(ds.y), k), np.float32)
    previous = None
    for f in range(folds):
        train_rows, held = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        if head == "fast-linear":
            cw = class_weights(ds.y[train_rows], k, class_weight)
            weights = None if cw is None else np.asarray([cw[c] for c in ds.y[train_rows]])
            previous = _fit_linear(ds.features[train_rows], ds.y[train_rows], k, l2, max_iter, weights, previous)
            proba[held] = previous.predict_proba(ds.features[held])
        else:
            proba[held] = fit_keras_fold(ds, train_rows, held, opts)
        if progress:
            print(f"fold {f + 1}/{folds}: {len(train_rows)} training, {len(held)} held-out images", flush=True)
    seconds = time.perf_counter() - t0
    fold_metrics = [classification_metrics(ds.y[fold == f], proba[fold == f], ds.classes, bootstrap=False)
                    for f in range(folds)]
    summary = {name: _interval([m.get(name) for m in fold_metrics], bounded=name != "log_loss")
               for name in SUMMARY_METRICS}
    pooled = classification_metrics(ds.y, proba, ds.classes, seed=seed)
    oof = pd.DataFrame({"path": ds.paths.astype(str), "content_id": ds.content_ids.astype(str),
                        "label": ds.labels.astype(str), "fold": fold.astype(np.int32)})
    for i, cls in enumerate(ds.classes):
        oof[f"prob_{cls}"] = proba[:, i]
    result = CVResult(oof=oof, classes=list(ds.classes), fold_metrics=fold_metrics, summary=summary, pooled=pooled,
                      folds=folds, head=head, seconds=seconds, notes=notes)
    if out is not None:
        result.out = _write(out, result, ds, seed, opts, l2)
    if progress:
        print(result.format(), flush=True)
    return result


def _fit_linear(x, y, k, l2, max_iter, weights, previous):
    from stage2_classify.training.linear import fit_linear

    return fit_linear(x, y, k, l2=l2, max_iter=max_iter, sample_weight=weights, init=previous)


def fit_keras_fold(ds: Dataset, train_rows: np.ndarray, held: np.ndarray, opts) -> np.ndarray:
    """The training head on one fold, chosen and early-stopped on a content-keyed 15% of the fold's training
    rows."""
    from stage2_classify.data.split import content_split
    from stage2_classify.training.fit import predict_proba
    from stage2_classify.training.heads import fit_head

    inner = content_split(ds.content_ids[train_rows], ds.y[train_rows], ds.groups[train_rows],
                          val_fraction=INNER_VALIDATION, test_fraction=0.0, seed=opts.seed)
    split = {"train": train_rows[inner["train"]], "validation": train_rows[inner["validation"]]}
    fitted = fit_head(ds, split, opts, progress=False)
    return predict_proba(fitted.model, ds.features[held])


def _write(out, result: CVResult, ds: Dataset, seed: int, opts, l2: float) -> str:
    import pyarrow as pa

    from shardformat import atomic_write_table, resolve

    out = os.path.abspath(os.fspath(out))
    os.makedirs(out, exist_ok=True)
    fs, root = resolve(out)
    atomic_write_table(pa.Table.from_pandas(result.oof, preserve_index=False), fs, f"{root}/oof_predictions.parquet")
    payload = {
        "shards": ds.source, "folds": result.folds, "seed": seed, "head": result.head,
        "head_options": {"l2": l2} if result.head == "fast-linear" else dataclasses.asdict(opts),
        "images": len(result.oof), "classes": result.classes, "seconds": round(result.seconds, 3),
        "summary": result.summary, "per_fold": result.fold_metrics, "pooled": result.pooled, "notes": result.notes,
    }
    atomic_write_json(os.path.join(out, "cv_metrics.json"), payload, default=None)
    return out
