"""Sweeps: several heads on vectors loaded once, ranked by cross-validated score with 95% intervals.

Every configuration is cross-validated on the same folds (``cv.py``: same images, same seed), and the table
ranks them by the mean over folds, with each candidate's difference to the best paired fold by fold and its
95% interval (``ranking.py``); candidates whose interval holds 0 are marked indistinguishable. One
validation split of ~100 images cannot tell heads apart; folds give every image a turn as held-out data.
``hidden`` 0 is the tuned linear head (``heads.py``), any other size an MLP. The best head is then fitted on
the content-keyed split (or the split file) exactly as ``train`` would, and kept as a complete run
directory (``OUT/best``), so the winner can be used at once; its test score is in ``sweep.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import os
import time
from typing import Sequence

from shardformat import atomic_write_text
from shardformat.layout import require_folder
from hybrid_common import renamed_keywords
from stage2_classify.backend import check_backend
from stage2_classify.data.dataset import Dataset, load_dataset
from stage2_classify.data.groups import regroup
from stage2_classify.data.split import split_notes
from stage2_classify.errors import DatasetError
from stage2_classify.options import OLD_RANK_KEYS, RANK_KEYS, CVOptions, SweepGrid, TrainOptions
from stage2_classify.training.fit import make_split, metrics_by_split, predict_proba, split_info
from stage2_classify.training.heads import fit_head
from stage2_classify.training.ranking import format_interval, rank_by_cv, tie_note

COLUMNS = ["rank", "hidden", "dropout", "learning_rate", "cv_macro_f1", "cv_macro_f1_low", "cv_macro_f1_high",
           "diff_vs_best", "diff_low", "diff_high", "indistinguishable_from_best", "cv_accuracy",
           "cv_balanced_accuracy", "cv_log_loss", "seconds"]


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


@renamed_keywords(shards="features")
def sweep(features: str | os.PathLike, out: str | os.PathLike | None = None, *,
          hidden: Sequence[Sequence[int]] = SweepGrid.hidden, dropout: Sequence[float] = SweepGrid.dropout,
          learning_rate: Sequence[float] = SweepGrid.learning_rate, rank_by: str = SweepGrid.rank_by,
          folds: int = CVOptions.folds, epochs: int = TrainOptions.epochs, batch_size: int = TrainOptions.batch_size,
          weight_decay: float = TrainOptions.weight_decay, patience: int = TrainOptions.patience,
          seed: int = TrainOptions.seed, val_fraction: float = TrainOptions.val_fraction,
          test_fraction: float = TrainOptions.test_fraction, class_weight: str = TrainOptions.class_weight,
          split_file: str | os.PathLike | None = TrainOptions.split_file,
          group_regex: str | None = TrainOptions.group_regex, groups: str | os.PathLike | None = TrainOptions.groups,
          matmul_precision: str = TrainOptions.matmul_precision, dataset: Dataset | None = None,
          progress: bool = True) -> list[dict]:
    """Cross-validate every combination of ``hidden`` × ``dropout`` × ``learning_rate``; return the rows best
    first.

    ``()`` (or ``(0,)``) in ``hidden`` is the tuned linear head, other sizes MLPs. Rows are ranked by the mean
    over ``folds`` folds of ``rank_by`` (``macro_f1`` by default: accuracy flatters a model that ignores small
    classes; ``balanced_accuracy``, ``accuracy`` or ``log_loss``; ``val_*`` are older spellings), with 95%
    intervals and the paired difference to the best. The other parameters are shared by all heads (see
    :func:`stage2_classify.train`). With ``out``, writes ``sweep.csv``, ``sweep.json``, ``sweep.txt`` (the
    printed table) and the best head, fitted on the train split, as the run directory ``out/best``.
    """
    from stage2_classify.training.cv import cross_validate

    rank_by = OLD_RANK_KEYS.get(rank_by, rank_by)
    if rank_by not in RANK_KEYS:
        raise ValueError(f"rank_by must be one of {', '.join(RANK_KEYS)}, not {rank_by!r}")
    if out is not None:
        require_folder(out)  # before training, not after it
    combos = _combinations(hidden, dropout, learning_rate)
    if not combos:
        raise ValueError("nothing to sweep: give at least one hidden size, dropout and learning rate")
    base = TrainOptions(epochs=epochs, batch_size=batch_size, weight_decay=weight_decay, patience=patience,
                        seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, class_weight=class_weight,
                        split_file=split_file, group_regex=group_regex, groups=groups,
                        matmul_precision=matmul_precision)
    check_backend()
    ds = regroup(dataset if dataset is not None else load_dataset(features), group_regex=group_regex, groups=groups)
    split = make_split(ds, base)
    if len(split["train"]) == 0:
        raise DatasetError(f"{os.fspath(features)}: no training rows after the split")
    if progress:
        print(f"sweep: {len(combos)} heads on {len(ds.y)} vectors ({ds.features.shape[1]}-d, {len(ds.classes)} "
              f"classes), loaded once; {folds}-fold cross-validation on the same folds for all", flush=True)
    results, seconds, options = {}, {}, {}
    for i, (h, d, lr) in enumerate(combos, 1):
        key = (h, d if h else None, lr)  # dropout and learning rate change nothing in the linear head
        if key not in results:
            opts = dataclasses.replace(base, head="mlp" if h else "linear", hidden=h, dropout=d, learning_rate=lr)
            t0 = time.perf_counter()
            results[key] = cross_validate(ds, folds=folds, seed=seed, head=opts.head, hidden=h, dropout=d,
                                          learning_rate=lr, epochs=epochs, batch_size=batch_size,
                                          weight_decay=weight_decay, patience=patience, class_weight=class_weight,
                                          progress=False)
            seconds[key], options[key] = time.perf_counter() - t0, opts
        if progress:
            m = results[key].summary.get(rank_by) or {}
            print(f"[{i}/{len(combos)}] hidden={'x'.join(map(str, h)) or 'linear'} dropout={d} lr={lr}: cv "
                  f"{rank_by.replace('_', ' ')} {_fmt(m.get('mean'))} {format_interval(m.get('ci95'))} "
                  f"({seconds[key]:.1f}s)", flush=True)
    ranked = rank_by_cv({k: results[k] for k in results}, rank_by)
    by_key = {r["name"]: r for r in ranked}
    rows = []
    for h, d, lr in combos:
        key = (h, d if h else None, lr)
        r, summary = by_key[key], results[key].summary
        ci, diff_ci = r[f"cv_{rank_by}_ci95"] or [None, None], r["diff_vs_best_ci95"] or [None, None]
        rows.append({"rank": r["rank"], "hidden": "x".join(map(str, h)) or "linear", "dropout": d,
                     "learning_rate": lr, "cv_macro_f1": (summary.get("macro_f1") or {}).get("mean"),
                     "cv_macro_f1_low": ci[0] if rank_by == "macro_f1" else _ci(summary, "macro_f1", 0),
                     "cv_macro_f1_high": ci[1] if rank_by == "macro_f1" else _ci(summary, "macro_f1", 1),
                     "diff_vs_best": r["diff_vs_best"], "diff_low": diff_ci[0], "diff_high": diff_ci[1],
                     "indistinguishable_from_best": r["indistinguishable_from_best"],
                     "cv_accuracy": (summary.get("accuracy") or {}).get("mean"),
                     "cv_balanced_accuracy": (summary.get("balanced_accuracy") or {}).get("mean"),
                     "cv_log_loss": (summary.get("log_loss") or {}).get("mean"),
                     "seconds": round(seconds[key], 2)})
    rows.sort(key=lambda row: (row["rank"], row["dropout"]))
    table = format_table(rows, rank_by) + "\n" + tie_note(
        [{"name": _label(row), **row} for row in rows], rank_by)
    if out is not None:
        os.makedirs(out, exist_ok=True)
        best_key = ranked[0]["name"]
        best_dir, best_metrics = _keep_best(os.path.join(out, "best"), features, ds, split, base, options[best_key])
        atomic_write_text(os.path.join(out, "sweep.csv"), _csv(rows))
        atomic_write_text(os.path.join(out, "sweep.json"), json.dumps(
            {"shards": os.fspath(features), "rank_by": rank_by, "folds": folds, "best_run": best_dir,
             "best_run_metrics": best_metrics, "split": split_info(base),
             "options": {k: v for k, v in dataclasses.asdict(base).items()
                         if k not in ("hidden", "dropout", "learning_rate", "head")}, "rows": rows}, indent=1))
        atomic_write_text(os.path.join(out, "sweep.txt"), table + "\n")
    if progress:
        print(table)
        if out is not None:
            print(f"written to {os.path.join(out, 'sweep.csv')} and sweep.json; best head (rank 1) fitted on the "
                  f"train split and kept as the run directory {os.path.join(out, 'best')}")
    return rows


def _ci(summary: dict, metric: str, end: int):
    ci = (summary.get(metric) or {}).get("ci95")
    return ci[end] if ci else None


def _label(row: dict) -> str:
    return f"hidden={row['hidden']}" + ("" if row["hidden"] == "linear" else
                                        f" dropout={row['dropout']} lr={row['learning_rate']}")


def _keep_best(run_dir: str, shards, ds: Dataset, split, base: TrainOptions, opts: TrainOptions):
    """Fit the rank-1 head on the split and write it as a complete run directory, exactly as ``train`` would;
    returns the directory and its validation and test headline numbers."""
    from stage2_classify.evaluation.metrics import majority_rate
    from stage2_classify.runs.files import write_run
    from stage2_classify.runs.writer import RunWriter

    fitted = fit_head(ds, split, opts, progress=False)
    proba = predict_proba(fitted.model, ds.features)
    metrics = metrics_by_split(ds, proba, split, seed=opts.seed)
    metrics = {**metrics, "head": fitted.choice, "classes": ds.classes,
               "majority_rate_test": majority_rate(ds.y[split["test"]]) if len(split["test"]) else None}
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
    headline = {name: {k: metrics[name].get(k) for k in ("accuracy", "macro_f1", "n")}
                for name in ("validation", "test") if name in metrics}
    return str(final), headline


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def format_table(rows: list[dict], rank_by: str = "macro_f1") -> str:
    """The sweep as a fixed-width text table, best first."""
    rank_by = OLD_RANK_KEYS.get(rank_by, rank_by)
    head = (f"{'#':>3s} {'hidden':>10s} {'dropout':>7s} {'lr':>8s} {'cv F1':>6s} {'95% interval':>15s} "
            f"{'vs best':>7s} {'paired 95%':>17s} {'cv acc':>6s} {'cv bal':>6s} {'s':>6s}")
    lines = [f"ranked by cross-validated {rank_by.replace('_', ' ')} (mean over folds; differences paired fold by "
             "fold; = : indistinguishable from the best)", head, "-" * len(head)]
    for r in rows:
        ci = format_interval([r["cv_macro_f1_low"], r["cv_macro_f1_high"]] if r["cv_macro_f1_low"] is not None
                             else None)
        diff = format_interval([r["diff_low"], r["diff_high"]] if r["diff_low"] is not None else None, "+.3f")
        lines.append(f"{r['rank']:>3d} {r['hidden']:>10s} {r['dropout']:>7.2f} {r['learning_rate']:>8.1e} "
                     f"{_fmt(r['cv_macro_f1']):>6s} {ci:>15s} {r['diff_vs_best']:>+7.3f} {diff:>17s}"
                     f"{'=' if r['indistinguishable_from_best'] and r['rank'] > 1 else ' '} "
                     f"{_fmt(r['cv_accuracy']):>6s} {_fmt(r['cv_balanced_accuracy']):>6s} {r['seconds']:>6.1f}")
    return "\n".join(lines)
