"""Comparison table (CSV, JSON, console) and bar chart for ``pipeline compare``."""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from shardformat import atomic_write_json, atomic_write_text, atomic_write_via_path


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'backbone':28s} {'val acc':>8s} {'val F1':>8s} {'test acc':>8s} {'test F1':>8s} {'img/s':>8s}"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: -(r["val_accuracy"] or 0)):
        def f(x, spec=".3f"):
            return format(x, spec) if isinstance(x, (int, float)) else "-"
        lines.append(f"{r['backbone'][:28]:28s} {f(r['val_accuracy']):>8s} {f(r['val_macro_f1']):>8s} "
                     f"{f(r['test_accuracy']):>8s} {f(r['test_macro_f1']):>8s} "
                     f"{f(r['extract_images_per_second'], '.1f'):>8s}")
    return "\n".join(lines)


def write_comparison(rows: list[dict[str, Any]], workdir: str | os.PathLike) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    paths = {k: os.path.join(workdir, f"compare.{k}") for k in ("csv", "json", "png")}
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(paths["csv"], table.getvalue())  # the project's one atomic writer (shardformat)
    atomic_write_json(paths["json"], rows)

    names = [r["backbone"] for r in rows]
    x = np.arange(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(rows) + 4), 4.5))
    width = 0.38
    val = [r["val_accuracy"] or 0 for r in rows]
    test = [r["test_accuracy"] or 0 for r in rows]
    b1 = ax1.bar(x - width / 2, val, width, label="validation")
    b2 = ax1.bar(x + width / 2, test, width, label="test")
    ax1.bar_label(b1, fmt="%.3f", fontsize=8)
    ax1.bar_label(b2, fmt="%.3f", fontsize=8)
    ax1.set_xticks(x, names, rotation=20, ha="right")
    ax1.set_ylim(0, 1.08)
    ax1.set_ylabel("accuracy")
    ax1.set_title("Classifier accuracy by backbone")
    ax1.legend(loc="lower right")
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
