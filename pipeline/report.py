"""Comparison table (CSV, JSON, console) and bar chart for ``pipeline compare``."""

from __future__ import annotations

import csv
import json
import os
from typing import Any


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
    with open(paths["csv"] + ".tmp", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(paths["csv"] + ".tmp", paths["csv"])
    with open(paths["json"] + ".tmp", "w") as fh:
        json.dump(rows, fh, indent=1)
    os.replace(paths["json"] + ".tmp", paths["json"])

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
    fig.savefig(paths["png"] + ".tmp.png", dpi=120)
    plt.close(fig)
    os.replace(paths["png"] + ".tmp.png", paths["png"])
    return paths
