"""Sweeps: several heads on vectors loaded once and one fixed split; a table sorted by validation score."""

from __future__ import annotations

import csv
import itertools
import json
import os
from typing import Sequence

from stage2_classify.data import load_dataset
from stage2_classify.train import TrainOptions, evaluate_splits, fit_head, make_split


def sweep(shards: str | os.PathLike, out: str | os.PathLike | None = None, *,
          hidden: Sequence[Sequence[int]] = ((0,), (256,), (512,)), dropout: Sequence[float] = (0.3,),
          learning_rate: Sequence[float] = (1e-3,), verbose: int = 1, **options) -> list[dict]:
    """Train every combination of ``hidden`` × ``dropout`` × ``learning_rate``; return rows best first.

    ``(0,)`` or ``()`` in ``hidden`` is a linear head. Other options are :class:`TrainOptions` fields
    shared by all heads. With ``out``, writes ``sweep.csv`` and ``sweep.json`` there.
    """
    ds = load_dataset(shards)
    base = TrainOptions(**options)
    split = make_split(ds, base)
    rows = []
    combos = list(itertools.product(hidden, dropout, learning_rate))
    for i, (h, d, lr) in enumerate(combos, 1):
        h = tuple(x for x in h if x)
        opts = TrainOptions(**{**base.__dict__, "hidden": h, "dropout": d, "learning_rate": lr})
        fitted = fit_head(ds, split, opts, verbose=0)
        metrics = evaluate_splits(fitted.model, ds, split)
        val, test = metrics.get("validation", {}), metrics.get("test", {})
        row = {
            "hidden": "x".join(map(str, h)) or "linear",
            "dropout": d,
            "learning_rate": lr,
            "val_accuracy": val.get("accuracy"),
            "val_macro_f1": val.get("macro_f1"),
            "test_accuracy": test.get("accuracy"),
            "test_macro_f1": test.get("macro_f1"),
            "epochs": len(fitted.history.get("loss", [])),
            "seconds": round(fitted.seconds, 2),
        }
        rows.append(row)
        if verbose:
            print(f"[{i}/{len(combos)}] hidden={row['hidden']} dropout={d} lr={lr}: "
                  f"val acc {row['val_accuracy'] or float('nan'):.3f} ({row['seconds']}s)", flush=True)
    rows.sort(key=lambda r: (-(r["val_accuracy"] or 0), -(r["val_macro_f1"] or 0)))
    if out is not None:
        os.makedirs(out, exist_ok=True)
        for name, writer in (("sweep.csv", _write_csv), ("sweep.json", _write_json)):
            path = os.path.join(out, name)
            writer(rows, path + ".tmp")
            os.replace(path + ".tmp", path)
    if verbose:
        print(format_table(rows))
    return rows


def _write_csv(rows, path):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _write_json(rows, path):
    with open(path, "w") as fh:
        json.dump(rows, fh, indent=1)


def format_table(rows: list[dict]) -> str:
    head = f"{'hidden':>10s} {'dropout':>7s} {'lr':>8s} {'val acc':>8s} {'val F1':>7s} {'test acc':>8s} {'epochs':>6s} {'s':>6s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['hidden']:>10s} {r['dropout']:>7.2f} {r['learning_rate']:>8.1e} "
                     f"{(r['val_accuracy'] or 0):>8.3f} {(r['val_macro_f1'] or 0):>7.3f} "
                     f"{(r['test_accuracy'] or 0):>8.3f} {r['epochs']:>6d} {r['seconds']:>6.1f}")
    return "\n".join(lines)
