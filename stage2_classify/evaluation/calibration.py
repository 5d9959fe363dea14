"""Calibration: does a predicted probability of 0.8 come true 80% of the time?

Expected calibration error (ECE) over equal-width bins of the top probability, the bins themselves (the
reliability-diagram PNG a run directory holds is drawn by ``reports/plots.py``).
"""

from __future__ import annotations

import numpy as np

BINS = 15


def reliability(y_true: np.ndarray, proba: np.ndarray, bins: int = BINS) -> dict:
    """ECE = Σ_bins (n_b / n) · |accuracy_b − mean confidence_b| on the predicted class's probability."""
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=bins)
    acc_sum = np.bincount(which, weights=correct.astype(np.float64), minlength=bins)
    out = []
    ece = 0.0
    for b in range(bins):
        if count[b] == 0:
            continue
        conf, acc = conf_sum[b] / count[b], acc_sum[b] / count[b]
        ece += count[b] / len(confidence) * abs(acc - conf)
        out.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(count[b]),
                    "confidence": float(conf), "accuracy": float(acc)})
    return {"ece": float(ece), "bins": out}
