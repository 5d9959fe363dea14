"""Using a trained run: load it safely, predict on shards, evaluate on labelled shards."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

import shardformat
from shardformat import ShardMetadata
from stage2_classify.rundir import check_run


@dataclasses.dataclass
class LoadedRun:
    path: Path
    model: object
    classes: list[str]
    metadata: ShardMetadata


def load_run(run_dir: str | os.PathLike) -> LoadedRun:
    """Load a complete run directory. The model is loaded with Keras' safe mode: no code, no pickle."""
    import keras

    from stage2_classify import _check_backend

    _check_backend()
    path = check_run(run_dir)
    model = keras.saving.load_model(path / "model.keras", compile=False, safe_mode=True)
    classes = json.loads((path / "labels.json").read_text())
    meta = ShardMetadata.from_json((path / "shard_metadata.json").read_text())
    return LoadedRun(path, model, classes, meta)


def _probabilities(run: LoadedRun, features: np.ndarray) -> np.ndarray:
    if len(features) == 0:
        return np.zeros((0, len(run.classes)), np.float32)
    return np.asarray(run.model.predict(features, batch_size=4096, verbose=0), dtype=np.float32)


def predict(shards: str | os.PathLike, model: str | os.PathLike, out: str | os.PathLike) -> str:
    """Write path, predicted label, its probability and one probability column per class for every row.

    Parquet, or CSV when ``out`` ends in ``.csv``. Shards made by another backbone, other weights or other
    preprocessing than the model was trained on are refused.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    run = load_run(model)
    fs = shardformat.read_features(shards, expect=run.metadata)
    probs = _probabilities(run, fs.features)
    top = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    columns = {
        "path": pa.array(fs.paths.tolist(), pa.string()),
        "label": pa.array(fs.labels.tolist(), pa.string()),
        "predicted": pa.array([run.classes[i] for i in top], pa.string()),
        "probability": pa.array(probs[np.arange(len(top)), top] if len(top) else [], pa.float32()),
    }
    for i, cls in enumerate(run.classes):
        columns[f"prob_{cls}"] = pa.array(probs[:, i], pa.float32())
    table = pa.table(columns)
    out = os.fspath(out)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.getpid()}-{os.path.basename(out)}")
    try:
        if out.lower().endswith(".csv"):
            pacsv.write_csv(table, tmp)
        else:
            fs_, path = shardformat.resolve(tmp)
            shardformat.atomic_write_table(table, fs_, path)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def evaluate(shards: str | os.PathLike, model: str | os.PathLike, out: str | os.PathLike | None = None,
             verbose: int = 1) -> dict:
    """Metrics of a trained run on every labelled row of ``shards`` (e.g. a held-out collection)."""
    from stage2_classify.metrics import classification_report, majority_rate

    run = load_run(model)
    fs = shardformat.read_features(shards, expect=run.metadata)
    index = {c: i for i, c in enumerate(run.classes)}
    known = np.fromiter((lbl in index for lbl in fs.labels), dtype=bool, count=len(fs))
    unlabelled = int(sum(lbl is None for lbl in fs.labels))
    unknown = sorted({lbl for lbl in fs.labels[~known] if lbl is not None})
    if not known.any():
        raise ValueError(f"{shards}: no rows carry a label the model knows ({run.classes})")
    y = np.fromiter((index[lbl] for lbl in fs.labels[known]), dtype=np.int64)
    pred = _probabilities(run, fs.features[known]).argmax(axis=1)
    report = classification_report(y, pred, run.classes)
    report["majority_rate"] = majority_rate(y)
    report["unlabelled_rows"] = unlabelled
    report["unknown_labels"] = unknown
    if out is not None:
        Path(out).write_text(json.dumps(report, indent=1))
    if verbose:
        print(f"evaluated {report['n']} rows of {shards} with {run.path}: accuracy {report['accuracy']:.3f}, "
              f"macro-F1 {report['macro_f1']:.3f} (majority rate {report['majority_rate']:.3f})"
              + (f"; {unlabelled} unlabelled rows skipped" if unlabelled else "")
              + (f"; labels unknown to the model skipped: {unknown}" if unknown else ""))
    return report
