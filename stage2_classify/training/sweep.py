"""Sweeps: several heads on vectors loaded once and one split; a table ranked by validation score.

Every configuration is trained and scored on the same content-keyed split (or the same split file); the
test columns are shown for information, never used for ranking. The best head is kept as a complete run
directory (``OUT/best``), so the winner can be used at once.
"""

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
from hybrid_common import renamed_keywords
from stage2_classify.backend import check_backend
from stage2_classify.data.dataset import Dataset, load_dataset
from stage2_classify.data.split import split_notes
from stage2_classify.errors import DatasetError
from stage2_classify.options import RANK_KEYS, SweepGrid, TrainOptions
from stage2_classify.training.fit import fit_head, make_split, metrics_by_split, predict_proba, split_info
COLUMNS = ["rank", "hidden", "dropout", "learning_rate", "val_accuracy", "val_balanced_accuracy", "val_macro_f1",
           "val_loss", "test_accuracy", "test_macro_f1", "epochs", "best_epoch", "seconds"]


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


@renamed_keywords(shards="features")
def sweep(features: str | os.PathLike, out: str | os.PathLike | None = None, *,
          hidden: Sequence[Sequence[int]] = SweepGrid.hidden, dropout: Sequence[float] = SweepGrid.dropout,
          learning_rate: Sequence[float] = SweepGrid.learning_rate, rank_by: str = SweepGrid.rank_by,
          epochs: int = TrainOptions.epochs, batch_size: int = TrainOptions.batch_size,
          patience: int = TrainOptions.patience, seed: int = TrainOptions.seed,
          val_fraction: float = TrainOptions.val_fraction, test_fraction: float = TrainOptions.test_fraction,
          class_weight: str = TrainOptions.class_weight, split_file: str | os.PathLike | None = TrainOptions.split_file,
          matmul_precision: str = TrainOptions.matmul_precision, dataset: Dataset | None = None,
          progress: bool = True) -> list[dict]:
    """Train every combination of ``hidden`` × ``dropout`` × ``learning_rate``; return the rows best first.

    ``()`` (or ``(0,)``) in ``hidden`` is a linear head. The other parameters are shared by all heads (one
    split, one seed; see :func:`stage2_classify.train`). Rows are ranked by ``rank_by`` on the validation
    split (``val_macro_f1`` by default: accuracy flatters a model that ignores small classes;
    ``val_balanced_accuracy``, ``val_accuracy`` or ``val_loss``; ties by macro-F1). With ``out``, writes
    ``sweep.csv``, ``sweep.json``, ``sweep.txt`` (the printed table) and the best head as the run directory
    ``out/best``. ``progress``: one line per head and the table.
    """
    if rank_by not in RANK_KEYS:
        raise ValueError(f"rank_by must be one of {', '.join(RANK_KEYS)}, not {rank_by!r}")
    if out is not None:
        require_folder(out)  # before training, not after it
    combos = _combinations(hidden, dropout, learning_rate)
    if not combos:
        raise ValueError("nothing to sweep: give at least one hidden size, dropout and learning rate")
    base = TrainOptions(epochs=epochs, batch_size=batch_size, patience=patience, seed=seed,
                        val_fraction=val_fraction, test_fraction=test_fraction, class_weight=class_weight,
                        split_file=split_file, matmul_precision=matmul_precision)
    check_backend()
    ds = dataset if dataset is not None else load_dataset(features)
    split = make_split(ds, base)
    if len(split["train"]) == 0:
        raise DatasetError(f"{os.fspath(features)}: no training rows after the split")
    if progress:
        print(f"sweep: {len(combos)} heads on {len(ds.y)} vectors ({ds.features.shape[1]}-d, {len(ds.classes)} "
              f"classes), loaded once; one split for all, train/val/test "
              f"{len(split['train'])}/{len(split['validation'])}/{len(split['test'])}", flush=True)
    rows, trained = [], {}
    for i, (h, d, lr) in enumerate(combos, 1):
        key = (h, d if h else None, lr)  # dropout changes nothing in a linear head: train that one once
        if key not in trained:
            opts = dataclasses.replace(base, hidden=h, dropout=d, learning_rate=lr)
            fitted = fit_head(ds, split, opts, progress=False)
            proba = predict_proba(fitted.model, ds.features)
            trained[key] = opts, fitted, proba, metrics_by_split(ds, proba, split, seed=seed)
        opts, fitted, _, metrics = trained[key]
        val, test = metrics.get("validation", {}), metrics.get("test", {})
        best = fitted.best_epoch - 1
        row = {
            "hidden": "x".join(map(str, h)) or "linear",
            "dropout": d,
            "learning_rate": lr,
            "val_accuracy": val.get("accuracy"),
            "val_balanced_accuracy": val.get("balanced_accuracy"),
            "val_macro_f1": val.get("macro_f1"),
            "val_loss": fitted.history["val_loss"][best] if "val_loss" in fitted.history else None,
            "test_accuracy": test.get("accuracy"),
            "test_macro_f1": test.get("macro_f1"),
            "epochs": len(fitted.history.get("loss", [])),
            "best_epoch": fitted.best_epoch,
            "seconds": round(fitted.seconds, 2),
            "_key": key,
        }
        rows.append(row)
        if progress:
            print(f"[{i}/{len(combos)}] hidden={row['hidden']} dropout={d} lr={lr}: val macro-F1 "
                  f"{_fmt(row['val_macro_f1'])}, accuracy {_fmt(row['val_accuracy'])} "
                  f"({row['epochs']} epochs, {row['seconds']}s)", flush=True)
    rows.sort(key=lambda r: (_score(r, rank_by), _score(r, "val_macro_f1")))
    best_key = rows[0]["_key"]
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    rows = [{k: row[k] for k in COLUMNS} for row in rows]
    table = format_table(rows, rank_by)
    if out is not None:
        os.makedirs(out, exist_ok=True)
        best_dir = _keep_best(os.path.join(out, "best"), features, ds, split, base, trained[best_key])
        atomic_write_text(os.path.join(out, "sweep.csv"), _csv(rows))
        atomic_write_text(os.path.join(out, "sweep.json"), json.dumps(
            {"shards": os.fspath(features), "rank_by": rank_by, "best_run": best_dir, "split": split_info(base),
             "options": {k: v for k, v in dataclasses.asdict(base).items()
                         if k not in ("hidden", "dropout", "learning_rate")}, "rows": rows}, indent=1))
        atomic_write_text(os.path.join(out, "sweep.txt"), table + "\n")
    if progress:
        print(table)
        if out is not None:
            print(f"written to {os.path.join(out, 'sweep.csv')} and sweep.json; best head (rank 1) kept as "
                  f"the run directory {os.path.join(out, 'best')}")
    return rows


def _keep_best(run_dir: str, shards, ds: Dataset, split, base: TrainOptions, trained) -> str:
    """Write the rank-1 head as a complete run directory, exactly as ``train`` would have."""
    from stage2_classify.evaluation.metrics import majority_rate
    from stage2_classify.runs.files import write_run
    from stage2_classify.runs.writer import RunWriter

    opts, fitted, proba, metrics = trained
    metrics = {**metrics, "majority_rate_test": majority_rate(ds.y[split["test"]]) if len(split["test"]) else None,
               "classes": ds.classes}
    writer = RunWriter(run_dir)
    try:
        final = write_run(writer, shards=shards, ds=ds, split=split,
                          notes=split_notes(ds.y, ds.classes, split, ds.content_ids, ds.groups,
                                           from_file=bool(base.split_file)), opts=opts,
                          fitted=fitted, metrics=metrics, proba=proba, split_info=split_info(base),
                          extra_marker={"chosen_by": "sweep"})
    except BaseException:
        writer.discard()
        raise
    return str(final)


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def format_table(rows: list[dict], rank_by: str = "val_macro_f1") -> str:
    """The sweep as a fixed-width text table, best first."""
    head = (f"{'#':>3s} {'hidden':>10s} {'dropout':>7s} {'lr':>8s} {'val acc':>8s} {'val bal':>7s} {'val F1':>7s} "
            f"{'val loss':>8s} {'test acc':>8s} {'test F1':>7s} {'epochs':>6s} {'s':>6s}")
    lines = [f"ranked by {rank_by.replace('_', ' ')}", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['rank']:>3d} {r['hidden']:>10s} {r['dropout']:>7.2f} {r['learning_rate']:>8.1e} "
                     f"{_fmt(r['val_accuracy']):>8s} {_fmt(r['val_balanced_accuracy']):>7s} "
                     f"{_fmt(r['val_macro_f1']):>7s} {_fmt(r['val_loss'], '.4f'):>8s} "
                     f"{_fmt(r['test_accuracy']):>8s} {_fmt(r['test_macro_f1']):>7s} {r['epochs']:>6d} "
                     f"{r['seconds']:>6.1f}")
    return "\n".join(lines)
