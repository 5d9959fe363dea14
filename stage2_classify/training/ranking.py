"""Ranking candidates (heads, backbones) by cross-validated macro-F1 with 95% intervals, each paired against the best.

Every candidate is cross-validated on the same folds (same images, same seed: ``cv.py``'s folds depend on
nothing else), so fold by fold the candidates saw the same held-out images and their differences can be
paired: the difference to the best is the mean of the per-fold differences, its 95% interval a t interval
over those K differences (the same interval ``cv`` gives a mean). When that interval holds 0 the two are
*indistinguishable* on this data: a one-split table of ~100 images would show a winner, cross-validation
shows a tie. With K folds the t interval is wide on purpose: K differences are all the evidence there is.
"""

from __future__ import annotations

import math

import numpy as np

RANK_METRICS = ("macro_f1", "balanced_accuracy", "accuracy", "log_loss")


def _t_interval(values: np.ndarray) -> list[float] | None:
    from scipy.stats import t

    values = values[np.isfinite(values)]
    if len(values) < 2:
        return None
    half = float(t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    mean = float(values.mean())
    return [mean - half, mean + half]


def fold_scores(cv_result, metric: str = "macro_f1") -> np.ndarray:
    """Per fold, ``metric`` of a :class:`~stage2_classify.training.cv.CVResult` (NaN where undefined)."""
    return np.asarray([np.nan if m.get(metric) is None else m[metric] for m in cv_result.fold_metrics], np.float64)


def rank_by_cv(results: dict, metric: str = "macro_f1") -> list[dict]:
    """``{name: CVResult}`` → rows best first: ``name``, ``cv_<metric>`` (mean), ``cv_<metric>_ci95``,
    ``diff_vs_best`` and its ``diff_vs_best_ci95`` (paired over folds), ``indistinguishable_from_best``.

    ``log_loss`` ranks lowest first, the others highest first.
    """
    if metric not in RANK_METRICS:
        raise ValueError(f"metric must be one of {', '.join(RANK_METRICS)}, not {metric!r}")
    sign = 1.0 if metric == "log_loss" else -1.0
    scores = {name: fold_scores(r, metric) for name, r in results.items()}
    folds = {len(s) for s in scores.values()}
    if len(folds) > 1:
        raise ValueError(f"candidates were cross-validated with different fold counts {sorted(folds)}: not paired")
    order = sorted(scores, key=lambda n: sign * np.nanmean(scores[n]) if np.isfinite(scores[n]).any() else math.inf)
    best = scores[order[0]]
    rows = []
    for rank, name in enumerate(order, 1):
        s = scores[name]
        diff = s - best
        ci = _t_interval(diff) if rank > 1 else None
        summary = results[name].summary.get(metric) or {}
        rows.append({
            "rank": rank, "name": name,
            f"cv_{metric}": float(np.nanmean(s)) if np.isfinite(s).any() else None,
            f"cv_{metric}_ci95": summary.get("ci95") or _t_interval(s),
            "diff_vs_best": float(np.nanmean(diff)) if rank > 1 else 0.0,
            "diff_vs_best_ci95": ci,
            "indistinguishable_from_best": rank == 1 or ci is None or ci[0] <= 0 <= ci[1],
        })
    return rows


def tie_note(rows: list[dict], metric: str = "macro_f1") -> str:
    """A sentence on which candidates the folds cannot tell from the best."""
    ties = [r["name"] for r in rows if r["rank"] > 1 and r["indistinguishable_from_best"]]
    if not rows:
        return ""
    if not ties:
        return f"{rows[0]['name']} is best, and the paired 95% intervals of every other candidate exclude a tie"
    return (f"indistinguishable from the best ({rows[0]['name']}) on cross-validated {metric.replace('_', '-')}: "
            f"{', '.join(map(str, ties))} (the paired 95% interval of the difference holds 0)")


def format_interval(ci, spec: str = ".3f") -> str:
    return "-" if not ci else f"[{format(ci[0], spec)}, {format(ci[1], spec)}]"
