"""Sweeps: several heads on vectors loaded once and one fixed split; a table sorted by validation score."""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import os
from typing import Sequence

from shardformat import atomic_write_text
from shardformat.layout import require_folder
from stage2_classify.data import Dataset, DatasetError, load_dataset
from stage2_classify.train import TrainOptions, evaluate_splits, fit_head, make_split, resolve_verbose

SORT_KEYS = ("val_accuracy", "val_macro_f1", "val_loss")
COLUMNS = ["rank", "hidden", "dropout", "learning_rate", "val_accuracy", "val_macro_f1", "val_loss",
           "test_accuracy", "test_macro_f1", "epochs", "best_epoch", "seconds"]


def _combinations(hidden, dropout, learning_rate) -> list[tuple[tuple[int, ...], float, float]]:
    """hidden × dropout × learning rate, in the order given, without exact repeats."""
    seen, combos = set(), []
    for h, d, lr in itertools.product(hidden, dropout, learning_rate):
        h = tuple(int(x) for x in (h if isinstance(h, (tuple, list)) else (h,)) if int(x))
        key = (h, float(d), float(lr))
        if key not in seen:
            seen.add(key)
            combos.append(key)
    return combos


def _score(row: dict, sort_by: str) -> float:
    value = row.get(sort_by)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.inf
    return value if sort_by == "val_loss" else -value


def sweep(shards: str | os.PathLike, out: str | os.PathLike | None = None, *,
          hidden: Sequence[Sequence[int]] = ((), (256,), (512,)), dropout: Sequence[float] = (0.3,),
          learning_rate: Sequence[float] = (1e-3,), sort_by: str = "val_accuracy", verbose: int | str = 1,
          dataset: Dataset | None = None, **options) -> list[dict]:
    """Train every combination of ``hidden`` × ``dropout`` × ``learning_rate``; return the rows best first.

    ``()`` (or ``(0,)``) in ``hidden`` is a linear head. Other options are :class:`TrainOptions` fields
    shared by all heads (same split, same seed). Rows are sorted by ``sort_by`` (``val_accuracy``,
    ``val_macro_f1`` or ``val_loss``; ties by macro-F1). With ``out``, writes ``sweep.csv``, ``sweep.json``
    and ``sweep.txt`` (the printed table) there. ``verbose``: 0 silent, otherwise one line per head and
    the table.
    """
    if sort_by not in SORT_KEYS:
        raise ValueError(f"sort_by must be one of {', '.join(SORT_KEYS)}, not {sort_by!r}")
    if out is not None:
        require_folder(out)  # before training, not after it
    combos = _combinations(hidden, dropout, learning_rate)
    if not combos:
        raise ValueError("nothing to sweep: give at least one hidden size, dropout and learning rate")
    base = TrainOptions(**options)
    verbose = resolve_verbose(verbose)
    from stage2_classify import _check_backend

    _check_backend()
    ds = dataset if dataset is not None else load_dataset(shards)
    split = make_split(ds, base)
    if len(split["train"]) == 0:
        raise DatasetError(f"{os.fspath(shards)}: no training rows after the split")
    if verbose:
        print(f"sweep: {len(combos)} heads on {len(ds.y)} vectors ({ds.features.shape[1]}-d, {len(ds.classes)} "
              f"classes), loaded once; train/val/test "
              f"{len(split['train'])}/{len(split['validation'])}/{len(split['test'])}", flush=True)
    rows, trained = [], {}
    for i, (h, d, lr) in enumerate(combos, 1):
        key = (h, d if h else None, lr)  # dropout changes nothing in a linear head: train that one once
        if key not in trained:
            opts = dataclasses.replace(base, hidden=h, dropout=d, learning_rate=lr)
            fitted = fit_head(ds, split, opts, verbose=0)
            trained[key] = fitted, evaluate_splits(fitted.model, ds, split)
        fitted, metrics = trained[key]
        val, test = metrics.get("validation", {}), metrics.get("test", {})
        best = fitted.best_epoch - 1
        row = {
            "hidden": "x".join(map(str, h)) or "linear",
            "dropout": d,
            "learning_rate": lr,
            "val_accuracy": val.get("accuracy"),
            "val_macro_f1": val.get("macro_f1"),
            "val_loss": fitted.history["val_loss"][best] if "val_loss" in fitted.history else None,
            "test_accuracy": test.get("accuracy"),
            "test_macro_f1": test.get("macro_f1"),
            "epochs": len(fitted.history.get("loss", [])),
            "best_epoch": fitted.best_epoch,
            "seconds": round(fitted.seconds, 2),
        }
        rows.append(row)
        if verbose:
            print(f"[{i}/{len(combos)}] hidden={row['hidden']} dropout={d} lr={lr}: val accuracy "
                  f"{_fmt(row['val_accuracy'])}, macro-F1 {_fmt(row['val_macro_f1'])} "
                  f"({row['epochs']} epochs, {row['seconds']}s)", flush=True)
    rows.sort(key=lambda r: (_score(r, sort_by), _score(r, "val_macro_f1")))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    rows = [{k: row[k] for k in COLUMNS} for row in rows]
    table = format_table(rows, sort_by)
    if out is not None:
        os.makedirs(out, exist_ok=True)
        atomic_write_text(os.path.join(out, "sweep.csv"), _csv(rows))
        atomic_write_text(os.path.join(out, "sweep.json"), json.dumps(
            {"shards": os.fspath(shards), "sort_by": sort_by, "options": {k: v for k, v in dataclasses.asdict(base).items()
                                                     if k not in ("hidden", "dropout", "learning_rate")}, "rows": rows}, indent=1))
        atomic_write_text(os.path.join(out, "sweep.txt"), table + "\n")
    if verbose:
        print(table)
        if out is not None:
            print(f"written to {os.path.join(out, 'sweep.csv')} and sweep.json")
    return rows


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def format_table(rows: list[dict], sort_by: str = "val_accuracy") -> str:
    """The sweep as a fixed-width text table, best first."""
    head = (f"{'#':>3s} {'hidden':>10s} {'dropout':>7s} {'lr':>8s} {'val acc':>8s} {'val F1':>7s} {'val loss':>8s} "
            f"{'test acc':>8s} {'test F1':>7s} {'epochs':>6s} {'s':>6s}")
    lines = [f"sorted by {sort_by.replace('_', ' ')}", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['rank']:>3d} {r['hidden']:>10s} {r['dropout']:>7.2f} {r['learning_rate']:>8.1e} "
                     f"{_fmt(r['val_accuracy']):>8s} {_fmt(r['val_macro_f1']):>7s} {_fmt(r['val_loss'], '.4f'):>8s} "
                     f"{_fmt(r['test_accuracy']):>8s} {_fmt(r['test_macro_f1']):>7s} {r['epochs']:>6d} "
                     f"{r['seconds']:>6.1f}")
    return "\n".join(lines)
