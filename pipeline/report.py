"""Comparison table (CSV, JSON, console) and bar chart for ``pipeline compare``."""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from shardformat import atomic_write_json, atomic_write_text, atomic_write_via_path


def _f(x, spec=".3f"):
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def _pair(low, high, spec=".3f") -> str:
    return "-" if low is None or high is None else f"[{format(low, spec)}, {format(high, spec)}]"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Best first: by cross-validated macro-F1 with intervals when the rows have it, else validation macro-F1."""
    if rows and rows[0].get("cv_macro_f1") is not None:
        head = (f"{'#':>2s} {'backbone':24s} {'cv F1':>6s} {'95% interval':>15s} {'vs best':>7s} "
                f"{'paired 95%':>17s}  {'test F1':>7s} {'img/s':>7s}")
        lines = ["ranked by cross-validated macro-F1 (mean over folds; differences paired fold by fold; "
                 "= : indistinguishable from the best)", head, "-" * len(head)]
        for r in sorted(rows, key=lambda r: r["rank"]):
            tie = "=" if r["indistinguishable_from_best"] and r["rank"] > 1 else " "
            lines.append(f"{r['rank']:>2d} {r['backbone'][:24]:24s} {_f(r['cv_macro_f1']):>6s} "
                         f"{_pair(r['cv_macro_f1_low'], r['cv_macro_f1_high']):>15s} {r['diff_vs_best']:>+7.3f} "
                         f"{_pair(r['diff_low'], r['diff_high'], '+.3f'):>17s}{tie} {_f(r['test_macro_f1']):>7s} "
                         f"{_f(r['extract_images_per_second'], '.1f'):>7s}")
        ties = [r["backbone"] for r in rows if r["rank"] > 1 and r["indistinguishable_from_best"]]
        best = next(r["backbone"] for r in rows if r["rank"] == 1)
        if ties:
            lines.append(f"indistinguishable from the best ({best}): {', '.join(ties)} — the paired "
                         "95% interval of the difference holds 0; choose on speed or size")
        return "\n".join(lines)
    head = f"{'backbone':28s} {'val acc':>8s} {'val F1':>8s} {'test acc':>8s} {'test F1':>8s} {'img/s':>8s}"
    lines = ["ranked by validation macro-F1 of one split (no cross-validation: --folds 0)", head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: -(r["val_macro_f1"] or 0)):
        lines.append(f"{r['backbone'][:28]:28s} {_f(r['val_accuracy']):>8s} {_f(r['val_macro_f1']):>8s} "
                     f"{_f(r['test_accuracy']):>8s} {_f(r['test_macro_f1']):>8s} "
                     f"{_f(r['extract_images_per_second'], '.1f'):>8s}")
    return "\n".join(lines)


def write_comparison(rows: list[dict[str, Any]], workdir: str | os.PathLike) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    paths = {k: os.path.join(workdir, f"compare.{k}") for k in ("csv", "json", "png", "txt")}
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(paths["csv"], table.getvalue())  # the project's one atomic writer (shardformat)
    atomic_write_json(paths["json"], rows)
    atomic_write_text(paths["txt"], format_table(rows) + "\n")

    names = [r["backbone"] for r in rows]
    x = np.arange(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(rows) + 4), 4.5))
    if rows[0].get("cv_macro_f1") is not None:  # cross-validated macro-F1 with its 95% interval
        mean = np.asarray([r["cv_macro_f1"] or 0 for r in rows])
        low = np.asarray([r["cv_macro_f1_low"] if r["cv_macro_f1_low"] is not None else m for r, m in zip(rows, mean)])
        high = np.asarray([r["cv_macro_f1_high"] if r["cv_macro_f1_high"] is not None else m
                           for r, m in zip(rows, mean)])
        b1 = ax1.bar(x, mean, 0.6, yerr=[mean - low, high - mean], capsize=4, label="cross-validated")
        ax1.bar_label(b1, fmt="%.3f", fontsize=8)
        ax1.set_ylabel("macro-F1 (mean over folds, 95% interval)")
        ax1.set_title("Classifier macro-F1 by backbone")
    else:
        width = 0.38
        val = [r["val_accuracy"] or 0 for r in rows]
        test = [r["test_accuracy"] or 0 for r in rows]
        b1 = ax1.bar(x - width / 2, val, width, label="validation")
        b2 = ax1.bar(x + width / 2, test, width, label="test")
        ax1.bar_label(b1, fmt="%.3f", fontsize=8)
        ax1.bar_label(b2, fmt="%.3f", fontsize=8)
        ax1.set_ylabel("accuracy")
        ax1.set_title("Classifier accuracy by backbone")
        ax1.legend(loc="lower right")
    ax1.set_xticks(x, names, rotation=20, ha="right")
    ax1.set_ylim(0, 1.08)
    speed = [r["extract_images_per_second"] or 0 for r in rows]
    b3 = ax2.bar(x, speed, 0.6, color="tab:green")
    ax2.bar_label(b3, fmt="%.0f", fontsize=8)
    ax2.set_xticks(x, names, rotation=20, ha="right")
    ax2.set_ylabel("images / second")
    ax2.set_title("Stage 1 extraction speed")
    fig.tight_layout()
    try:
        atomic_write_via_path(paths["png"], lambda tmp: fig.savefig(tmp, dpi=120))
    finally:
        plt.close(fig)
    return paths
