"""Classification metrics from scikit-learn, with bootstrap intervals and calibration.

One call, :func:`classification_metrics`, gives everything a split's report holds: accuracy, balanced
accuracy, macro-F1, per class precision / recall (sensitivity) / specificity / F1 / support / ROC AUC,
one-vs-rest ROC AUC, top-k accuracy, log-loss, expected calibration error with its reliability bins, and
95% bootstrap intervals. A value that cannot be computed (a class with no rows in the split, AUC with one
class present) is ``None`` (JSON null), never a made-up 0.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from stage2_classify.evaluation.calibration import reliability

BOOTSTRAP_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
TOP_K = (2, 3, 5)


def _num(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _confusion_stats(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class accuracy statistics from a confusion matrix (rows true, columns predicted); NaN if undefined.

    Works on a stack of matrices (..., k, k), which is how the bootstrap evaluates all resamples at once.
    """
    cm = cm.astype(np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    actual, predicted = cm.sum(axis=-1), cm.sum(axis=-2)
    total = actual.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, np.where(actual > 0, 0.0, np.nan))
        recall = np.where(actual > 0, tp / actual, np.nan)
        negatives = total - actual
        specificity = np.where(negatives > 0, (negatives - (predicted - tp)) / negatives, np.nan)
        f1 = np.where(actual > 0, np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0),
                      np.nan)
    return {"tp": tp, "actual": actual, "precision": precision, "recall": recall, "specificity": specificity,
            "f1": f1, "total": total[..., 0]}


def _summary_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """accuracy, balanced accuracy and macro-F1 (over classes present in the truth) of one or many matrices.

    The same definitions as scikit-learn's ``accuracy_score``, ``balanced_accuracy_score`` and
    ``f1_score(average="macro", labels=<classes present>)``; a test checks they agree.
    """
    s = _confusion_stats(cm)
    with np.errstate(invalid="ignore"):
        return {"accuracy": s["tp"].sum(axis=-1) / s["total"],
                "balanced_accuracy": np.nanmean(s["recall"], axis=-1),
                "macro_f1": np.nanmean(s["f1"], axis=-1)}


def summary_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy and macro-F1 of one confusion matrix (k, k) or a stack of them (..., k, k)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a resample without some class gives NaN for that class, skipped
        return _summary_from_confusion(cm)


def bootstrap_intervals(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, *, resamples: int = 1000,
                        seed: int = 0, level: float = 0.95) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals (``scipy.stats.bootstrap``, rows resampled with replacement).

    Rows are resampled independently: with groups (patients) the real uncertainty is larger.
    """
    from scipy.stats import bootstrap

    n = len(y_true)
    if n < 2:
        return {m: None for m in BOOTSTRAP_METRICS}
    cell = np.asarray(y_true, np.int64) * n_classes + np.asarray(y_pred, np.int64)

    def statistic(cells, axis=-1):
        cells = np.moveaxis(np.asarray(cells), axis, -1)
        lead = cells.shape[:-1]
        flat = cells.reshape(-1, cells.shape[-1])
        offset = (np.arange(len(flat)) * n_classes * n_classes)[:, None]
        counts = np.bincount((flat + offset).ravel(), minlength=len(flat) * n_classes * n_classes)
        cms = counts.reshape(len(flat), n_classes, n_classes)
        values = _summary_from_confusion(cms)
        return np.stack([values[m] for m in BOOTSTRAP_METRICS]).reshape(len(BOOTSTRAP_METRICS), *lead)

    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore")  # degenerate resamples (one class) give NaN, handled below
        res = bootstrap((cell,), statistic, n_resamples=resamples, vectorized=True, method="percentile",
                        confidence_level=level, random_state=np.random.default_rng(seed), batch=200)
    low, high = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
    return {m: (None if not (np.isfinite(lo) and np.isfinite(hi)) else [float(lo), float(hi)])
            for m, lo, hi in zip(BOOTSTRAP_METRICS, low, high)}


def _macro_f1_of_resamples(y_true: np.ndarray, y_pred: np.ndarray, idx: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-F1 of each resample (rows of ``idx``), from one bincount of all their confusion matrices."""
    cells = (y_true[idx] * n_classes + y_pred[idx]) + (np.arange(len(idx)) * n_classes * n_classes)[:, None]
    cms = np.bincount(cells.ravel(), minlength=len(idx) * n_classes * n_classes).reshape(-1, n_classes, n_classes)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _summary_from_confusion(cms)["macro_f1"]


def paired_difference(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, n_classes: int, *,
                      resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Macro-F1 of ``pred_b`` minus that of ``pred_a`` on the same rows, with a paired percentile bootstrap
    interval (both scored on each resample of the rows): ``{"difference", "ci95"}``."""
    y_true, pred_a, pred_b = (np.asarray(v, np.int64) for v in (y_true, pred_a, pred_b))
    n = len(y_true)
    full = (_macro_f1_of_resamples(y_true, pred_b, np.arange(n)[None], n_classes)
            - _macro_f1_of_resamples(y_true, pred_a, np.arange(n)[None], n_classes))[0] if n else np.nan
    if n < 2:
        return {"difference": None if not np.isfinite(full) else float(full), "ci95": None}
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    diff = _macro_f1_of_resamples(y_true, pred_b, idx, n_classes) - _macro_f1_of_resamples(y_true, pred_a, idx,
                                                                                            n_classes)
    diff = diff[np.isfinite(diff)]
    alpha = (1 - level) / 2
    ci = [float(np.quantile(diff, alpha)), float(np.quantile(diff, 1 - alpha))] if len(diff) else None
    return {"difference": float(full), "ci95": ci}


def _auc_per_class(y_true: np.ndarray, proba: np.ndarray) -> list[float | None]:
    from sklearn.metrics import roc_auc_score

    out = []
    for c in range(proba.shape[1]):
        positive = y_true == c
        if positive.all() or not positive.any():
            out.append(None)  # AUC needs both positives and negatives
        else:
            out.append(float(roc_auc_score(positive, proba[:, c])))
    return out


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, classes: list[str], *, bootstrap: bool = True,
                           resamples: int = 1000, seed: int = 0) -> dict:
    """Every metric of one split from true class indices and predicted probabilities (n, k)."""
    y_true = np.asarray(y_true, np.int64)
    proba = np.asarray(proba, np.float64)
    k = len(classes)
    if len(y_true) == 0:
        empty = dict.fromkeys(("precision", "recall", "specificity", "f1", "support", "roc_auc"))
        return {"n": 0, "accuracy": None, "balanced_accuracy": None, "macro_f1": None, "roc_auc_ovr": None,
                "top_k_accuracy": {}, "log_loss": None, "per_class": {c: dict(empty) for c in classes},
                "confusion_matrix": np.zeros((k, k), np.int64).tolist(), "ece": None, "reliability": []}
    with warnings.catch_warnings():
        # zero-division and "y_pred contains classes not in y_true" warnings are expected in small splits;
        # the values they concern are reported as null below
        warnings.simplefilter("ignore")
        out = _report(y_true, proba, classes)
    if bootstrap:
        out["ci95"] = bootstrap_intervals(y_true, proba.argmax(axis=1), k, resamples=resamples, seed=seed)
    return out


def _report(y_true: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict:
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, log_loss,
                                 precision_recall_fscore_support, top_k_accuracy_score)

    k = len(classes)
    labels = np.arange(k)
    y_pred = proba.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    present = np.flatnonzero(np.bincount(y_true, minlength=k) > 0)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                                     zero_division=np.nan)
    specificity = _confusion_stats(cm)["specificity"]
    auc = _auc_per_class(y_true, proba)
    per_class = {}
    for i, c in enumerate(classes):
        has_rows = int(support[i]) > 0
        per_class[c] = {
            "precision": _num(precision[i]),  # null when nothing was predicted as this class
            "recall": _num(recall[i]) if has_rows else None,
            "specificity": _num(specificity[i]),
            "f1": _num(f1[i]) if has_rows else None,
            "support": int(support[i]) if has_rows else None,
            "roc_auc": auc[i],
        }
    cal = reliability(y_true, proba)
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "roc_auc_ovr": _mean([a for a in auc if a is not None]),
        "top_k_accuracy": {str(t): float(top_k_accuracy_score(y_true, proba, k=t, labels=labels))
                           for t in TOP_K if t < k},
        "log_loss": float(log_loss(y_true, _normalised(proba), labels=labels)),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "ece": cal["ece"],
        "reliability": cal["bins"],
    }


def _normalised(proba: np.ndarray) -> np.ndarray:
    """float32 softmax outputs sum to 1 only within rounding; log-loss wants them exact and never 0."""
    p = np.clip(proba, 1e-7, 1.0)
    return p / p.sum(axis=1, keepdims=True)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def majority_rate(y: np.ndarray) -> float | None:
    """Accuracy of always answering the most frequent class: the floor any model must beat."""
    if len(y) == 0:
        return None
    return float(np.bincount(y).max() / len(y))


def format_metric(metrics: dict, name: str, label: str | None = None) -> str:
    """``accuracy 0.91 [0.87–0.94]`` (the interval when the metrics hold one)."""
    value = metrics.get(name)
    text = f"{label or name.replace('_', ' ')} {'-' if value is None else format(value, '.3f')}"
    ci = (metrics.get("ci95") or {}).get(name)
    return text + (f" [{ci[0]:.3f}–{ci[1]:.3f}]" if ci else "")
