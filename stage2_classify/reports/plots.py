"""PNG plots of a training run: loss/accuracy curves, the confusion matrix and the reliability diagram.

Each plot is its own ``matplotlib.figure.Figure``, saved through the figure: no ``pyplot``, no
``matplotlib.use``, so training in a notebook leaves its plotting backend and its open figures as they were
(``Figure.savefig`` renders with the Agg canvas whatever the backend), and nothing needs closing.
"""

from __future__ import annotations

import numpy as np


def _figure(figsize):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def plot_curves(history: dict[str, list[float]], path: str, best_epoch: int | None = None) -> None:
    from matplotlib.ticker import MaxNLocator

    fig = _figure((10, 4))
    axes = fig.subplots(1, 2)
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for ax, key, title in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy")):
        if key in history:
            ax.plot(epochs, history[key], label="train", marker=".")
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], label="validation", marker=".")
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_confusion(cm: np.ndarray, classes: list[str], path: str, title: str = "confusion matrix (test)") -> None:
    cm = np.asarray(cm)
    k = len(classes)
    size = max(5, 0.6 * k + 3)
    fig = _figure((size, size * 0.9))
    ax = fig.subplots()
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if frac[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_reliability(bins: list[dict], ece: float | None, path: str, title: str = "reliability (test)") -> None:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with the bin counts below."""
    fig = _figure((5, 6))
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
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
