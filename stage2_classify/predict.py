"""Using a trained run: load it safely, predict (on images or shards), evaluate on labelled shards."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

import shardformat
from shardformat import ShardMetadata
from stage2_classify.data import DatasetError, labelled_mask
from stage2_classify.rundir import check_run


@dataclasses.dataclass
class LoadedRun:
    path: Path
    model: object
    classes: list[str]
    metadata: ShardMetadata  # the stage-1 metadata of the shards the model was trained on


def load_run(run_dir: str | os.PathLike) -> LoadedRun:
    """Load a complete run directory. The model is loaded with Keras' safe mode: no code, nothing unpickled."""
    from stage2_classify import _check_backend

    path = check_run(run_dir)
    _check_backend()
    import keras

    model = keras.saving.load_model(path / "model.keras", compile=False, safe_mode=True)
    classes = json.loads((path / "labels.json").read_text())
    meta = ShardMetadata.from_json((path / "shard_metadata.json").read_text())
    n_out = int(model.outputs[0].shape[-1])
    if not isinstance(classes, list) or len(classes) != n_out:
        raise DatasetError(f"{path}: labels.json lists {len(classes)} classes but the model has {n_out} outputs")
    return LoadedRun(path, model, [str(c) for c in classes], meta)


def _read(shards, run: LoadedRun) -> shardformat.FeatureSet:
    """The shards' vectors, refused unless made like the ones the model was trained on."""
    fs = shardformat.read_features(shards, expect=run.metadata)
    if len(fs) == 0 or fs.metadata is None:
        raise DatasetError(f"{os.fspath(shards)}: no feature shards (part-*.parquet) found; "
                           f"run stage1-extract --out {os.fspath(shards)} first")
    return fs


def _probabilities(run: LoadedRun, features: np.ndarray) -> np.ndarray:
    from stage2_classify.train import predict_proba

    return predict_proba(run.model, features)


def _atomic_write(write, out: str) -> None:
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.getpid()}-{os.path.basename(out)}")
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def predict(inputs, model: str | os.PathLike, out: str | os.PathLike | None = None, *, top_k: int = 3,
            progress: bool = True, **options):
    """Predict with the run in ``model`` on images or vectors; returns a pandas DataFrame, also written to
    ``out`` when given (CSV when the name ends in ``.csv``, Parquet otherwise).

    ``inputs``: one image file, a folder, a file list, a list of paths, a shard directory or an (n, D) array
    (see :meth:`stage2_classify.Classifier.predict`, which takes the same ``options``). Shards made by another
    backbone, other weights or other preprocessing than the model's are refused
    (:class:`shardformat.IncompatibleShardsError`).
    """
    from stage2_classify.classifier import Classifier

    return Classifier.load(model).predict(inputs, top_k=top_k, out=out, progress=progress, **options)


def evaluate(shards: str | os.PathLike, model: str | os.PathLike, out: str | os.PathLike | None = None,
             verbose: int = 1) -> dict:
    """Metrics of a trained run on every labelled row of ``shards`` (e.g. a held-out collection).

    Rows without a label, and rows whose label the model was not trained on, are counted and skipped.
    With ``out``, the metrics are also written there as JSON.
    """
    from stage2_classify.metrics import classification_report, majority_rate

    run = load_run(model)
    fs = _read(shards, run)
    has_label = labelled_mask(fs.labels)
    labels = fs.labels[has_label].astype(str)
    known = np.isin(labels, np.asarray(run.classes, dtype=str))
    unknown = sorted(set(np.unique(labels[~known]).tolist()))
    if not known.any():
        raise DatasetError(f"{os.fspath(shards)}: no rows carry a label the model knows "
                           f"({', '.join(run.classes[:10])}{', …' if len(run.classes) > 10 else ''})")
    order = np.argsort(np.asarray(run.classes, dtype=str))
    y = order[np.searchsorted(np.asarray(run.classes, dtype=str), labels[known], sorter=order)]
    pred = _probabilities(run, fs.features[has_label][known]).argmax(axis=1)
    report = classification_report(y, pred, run.classes)
    report["majority_rate"] = majority_rate(y)
    report["unlabelled_rows"] = int((~has_label).sum())
    report["unknown_labels"] = unknown
    report["unknown_label_rows"] = int((~known).sum())
    if out is not None:
        text = json.dumps(report, indent=1)
        _atomic_write(lambda tmp: Path(tmp).write_text(text), os.fspath(out))
    if verbose:
        print(f"evaluated {report['n']} rows of {os.fspath(shards)} with {run.path}: accuracy "
              f"{report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f} "
              f"(majority-class rate {report['majority_rate']:.3f})"
              + (f"; {report['unlabelled_rows']} unlabelled rows skipped" if report["unlabelled_rows"] else "")
              + (f"; {report['unknown_label_rows']} rows with labels unknown to the model skipped: {unknown[:10]}"
                 if unknown else ""))
    return report
