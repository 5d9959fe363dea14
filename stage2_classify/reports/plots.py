"""PNG plots of a training run: loss/accuracy curves, the confusion matrix and the reliability diagram.

Each plot is its own ``matplotlib.figure.Figure``, saved through the figure: no ``pyplot``, no
``matplotlib.use``, so training in a notebook leaves its plotting backend and its open figures as they were
(``Figure.savefig`` renders with the Agg canvas whatever the backend), and nothing needs closing.

Class names are user data (folder names): they are drawn as plain text, never parsed as mathtext (a class
folder ``$\\foo$`` would otherwise stop the plot), and a plot that still fails costs that picture only, never
the trained run: each function logs a warning and leaves its PNG out (the report says which file is missing).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os

import numpy as np

log = logging.getLogger(__name__)


def _never_fatal(plot):
    """A failing plot logs a warning and writes nothing; Ctrl-C and other non-``Exception`` errors still stop."""

    @functools.wraps(plot)
    def guarded(*args, **kwargs):
        try:
            plot(*args, **kwargs)
        except Exception as exc:
            path = inspect.signature(plot).bind(*args, **kwargs).arguments.get("path", "?")
            log.warning("could not draw %s (%s: %s); the run is saved without this picture",
                        os.path.basename(os.fspath(path)), type(exc).__name__, exc)
            try:
                os.unlink(path)  # never a half-written PNG
            except (OSError, TypeError):
                pass

    return guarded


def _figure(figsize):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


@_never_fatal
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
        if len(epochs):
            ax.legend()
        else:  # a linear head is fitted in closed form (L-BFGS on the train split), not in epochs
            ax.text(0.5, 0.5, "no epochs: the kept head was fitted in one solve\n(linear head, L2 chosen on "
                    "validation)", ha="center", va="center", transform=ax.transAxes, color="grey", parse_math=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@_never_fatal
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
    ax.set_xticks(range(k), classes, rotation=45, ha="right", parse_math=False)  # names as written
    ax.set_yticks(range(k), classes, parse_math=False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, parse_math=False)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if frac[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@_never_fatal
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
    top.set_title(f"{title}: ECE {ece:.3f}" if ece is not None else title, parse_math=False)
    top.legend(loc="upper left")
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
