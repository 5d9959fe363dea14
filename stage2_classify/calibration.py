"""Calibration: does a predicted probability of 0.8 come true 80% of the time?

Expected calibration error (ECE) over equal-width bins of the top probability, the bins themselves, and
the reliability-diagram PNG a run directory holds.
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


def plot_reliability(bins: list[dict], ece: float | None, path: str, title: str = "reliability (test)") -> None:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with the bin counts below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    if bins:
        centres = [(b["low"] + b["high"]) / 2 for b in bins]
        widths = [b["high"] - b["low"] for b in bins]
        top.bar(centres, [b["accuracy"] for b in bins], width=widths, edgecolor="black", alpha=0.7,
                label="accuracy in bin")
        top.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="black", markersize=3)
        bottom.bar(centres, [b["count"] for b in bins], width=widths, edgecolor="black", color="grey")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"{title}: ECE {ece:.3f}" if ece is not None else title)
    top.legend(loc="upper left")
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
