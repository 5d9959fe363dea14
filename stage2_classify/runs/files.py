"""The files of a run directory beyond the model: split.csv, predictions.parquet, metrics, plots, run.json.

Written by ``train`` and by ``sweep`` for its best head, so both leave the same complete run directory.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os

import numpy as np

from stage2_classify.data.split import SPLITS, split_codes
from stage2_classify.data.splitfile import split_table, write_split_csv
from stage2_classify.inference.ood import fit_for_run as fit_ood_for_run
from stage2_classify.reports.run_report import write_run_report
from stage2_classify.runs.layout import LABELS_HASH_KEY, labels_hash

log = logging.getLogger(__name__)


def predictions_table(ds, proba: np.ndarray, split: dict[str, np.ndarray]):
    """One row per labelled row: path, content_id, label, split, predicted, probability, prob_<class>…"""
    import pyarrow as pa

    codes = split_codes(split, len(ds.y))
    top = proba.argmax(axis=1)
    names = np.asarray(SPLITS, dtype=object)
    columns = {
        "path": pa.array(ds.paths, pa.string()),
        "content_id": pa.array(ds.content_ids, pa.string()),
        "label": pa.array(ds.labels, pa.string()),
        "split": pa.array([names[c] if c >= 0 else None for c in codes], pa.string()),
        "predicted": pa.array(np.asarray(ds.classes, dtype=object)[top], pa.string()),
        "probability": pa.array(proba[np.arange(len(top)), top], pa.float32()),
    }
    for i, cls in enumerate(ds.classes):
        columns[f"prob_{cls}"] = pa.array(proba[:, i], pa.float32())
    return pa.table(columns)


def write_run(writer, *, shards, ds, split, notes, opts, fitted, metrics, proba, split_info: dict,
              extra_marker: dict | None = None):
    """Fill a :class:`~stage2_classify.runs.writer.RunWriter` with a whole run and commit it; returns the final path."""
    import pyarrow.parquet as pq

    from stage2_classify.reports import plots  # looked up at call time: tests replace a plot to interrupt a run

    labels_sha = labels_hash(ds.classes)
    writer.write_json("labels.json", ds.classes)
    writer.write_text("shard_metadata.json", ds.metadata.to_json())
    writer.write_json("config.json", {
        **dataclasses.asdict(opts), "shards": os.fspath(shards), "feature_dim": int(ds.features.shape[1]),
        "class_weight_used": fitted.class_weight, "unlabelled_rows_left_out": ds.unlabelled,
        "duplicate_rows_dropped": ds.duplicate_rows_dropped, "split": split_info,
        "split_sizes": {k: int(len(v)) for k, v in split.items()}, "notes": notes, LABELS_HASH_KEY: labels_sha,
    })
    writer.write_json("metrics.json", metrics)
    writer.write_json("history.json", fitted.history)
    write_split_csv(split_table(ds.paths, ds.content_ids, ds.labels, ds.groups, split), writer.path("split.csv"))
    pq.write_table(predictions_table(ds, proba, split), writer.path("predictions.parquet"), compression="zstd")
    plots.plot_curves(fitted.history, writer.path("curves.png"), fitted.best_epoch)
    shown = next(s for s in ("test", "validation", "train") if s in metrics)
    plots.plot_confusion(np.asarray(metrics[shown]["confusion_matrix"]), ds.classes, writer.path("confusion_matrix.png"),
                   title=f"confusion matrix ({shown})")
    plots.plot_reliability(metrics[shown].get("reliability", []), metrics[shown].get("ece"),
                     writer.path("reliability.png"), title=f"reliability ({shown})")
    fitted.model.save(writer.path("model.keras"))
    fit_ood_for_run(writer.tmp, ds, split)  # the 'unknown' flag's detector (inference/ood.py)
    final = writer.commit({
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "classes": len(ds.classes),
        LABELS_HASH_KEY: labels_sha,
        "train_seconds": round(fitted.seconds, 3),
        "epochs_run": len(fitted.history.get("loss", [])),
        "best_epoch": fitted.best_epoch,
        **(extra_marker or {}),
    })
    # The page is written once the run is complete (it shows the run's marker too). It is a view of files that
    # are already safe: a failure here (e.g. a full disk) costs the page, never the trained run.
    try:
        write_run_report(final)
    except OSError as exc:
        log.warning("the run is saved in %s, but its report.html could not be written: %s", final, exc)
    return final
