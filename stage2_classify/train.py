"""Training: load shards → split → fit the head with early stopping → metrics, plots, model in a run dir."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import time
from typing import Sequence

import numpy as np

from stage2_classify.data import Dataset, DatasetError, load_dataset, split_from_file, stratified_split
from stage2_classify.metrics import classification_report, majority_rate


@dataclasses.dataclass
class TrainOptions:
    hidden: Sequence[int] = (256,)
    dropout: float = 0.3
    learning_rate: float = 1e-3
    epochs: int = 50
    batch_size: int = 256
    patience: int = 5
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    class_weight: str = "auto"  # auto | balanced | none
    split_file: str | None = None

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        if any(h <= 0 for h in self.hidden):
            raise ValueError(f"hidden sizes must be positive, got {self.hidden} (use () for a linear head)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.class_weight not in ("auto", "balanced", "none"):
            raise ValueError(f"class_weight must be auto, balanced or none, not {self.class_weight!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")


@dataclasses.dataclass
class TrainResult:
    run_dir: str
    metrics: dict
    history: dict
    classes: list[str]
    summary: str


@dataclasses.dataclass
class FittedHead:
    model: object
    history: dict
    best_epoch: int
    seconds: float
    class_weight: dict | None


def class_weights(y: np.ndarray, n_classes: int, mode: str) -> dict | None:
    """Balanced weights n / (k · n_c); ``auto`` applies them when the largest class is >1.5× the smallest."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    if mode == "none" or not present.any():
        return None
    if mode == "auto" and counts[present].max() / counts[present].min() <= 1.5:
        return None
    weights = np.where(present, counts.sum() / (present.sum() * np.maximum(counts, 1)), 0.0)
    return {i: float(w) for i, w in enumerate(weights)}


def make_split(ds: Dataset, opts: TrainOptions) -> dict[str, np.ndarray]:
    if opts.split_file:
        return split_from_file(ds.paths, opts.split_file)
    return stratified_split(ds.labels, val_fraction=opts.val_fraction, test_fraction=opts.test_fraction,
                            seed=opts.seed)


def fit_head(ds: Dataset, split: dict[str, np.ndarray], opts: TrainOptions, verbose: int = 1) -> FittedHead:
    """Fit one head on the train split, early-stopping on validation loss with the best weights restored."""
    import keras

    from stage2_classify import _check_backend
    from stage2_classify.model import build_head

    _check_backend()
    keras.utils.set_random_seed(opts.seed)
    y = ds.y
    tr, va = split["train"], split["validation"]
    x_train = ds.features[tr]
    model = build_head(ds.features.shape[1], len(ds.classes), hidden=opts.hidden, dropout=opts.dropout,
                       learning_rate=opts.learning_rate, mean=x_train.mean(axis=0), variance=x_train.var(axis=0))
    has_val = len(va) > 0
    monitor = "val_loss" if has_val else "loss"
    callbacks = [keras.callbacks.EarlyStopping(monitor=monitor, patience=opts.patience, restore_best_weights=True)]
    cw = class_weights(y[tr], len(ds.classes), opts.class_weight)
    t0 = time.perf_counter()
    hist = model.fit(
        x_train, y[tr],
        validation_data=(ds.features[va], y[va]) if has_val else None,
        epochs=opts.epochs, batch_size=opts.batch_size, shuffle=True,
        class_weight=cw, callbacks=callbacks, verbose=verbose,
    )
    seconds = time.perf_counter() - t0
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    series = history.get(monitor, [0.0])
    return FittedHead(model, history, int(np.argmin(series)) + 1, seconds, cw)


def predict_classes(model, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    if len(features) == 0:
        return np.zeros((0,), np.int64)
    return np.asarray(model.predict(features, batch_size=batch_size, verbose=0)).argmax(axis=1)


def evaluate_splits(model, ds: Dataset, split: dict[str, np.ndarray]) -> dict:
    y = ds.y
    out = {}
    for name in ("train", "validation", "test"):
        idx = split.get(name, np.zeros(0, np.int64))
        if len(idx):
            out[name] = classification_report(y[idx], predict_classes(model, ds.features[idx]), ds.classes)
    return out


def _summary(ds: Dataset, split, fitted: FittedHead, metrics: dict, run_dir: str) -> str:
    y = ds.y
    lines = [
        f"stage 2 done: {run_dir}",
        f"  data     {len(ds.labels)} labelled vectors ({ds.metadata.backbone}, {ds.features.shape[1]}-d), "
        f"{len(ds.classes)} classes; train/val/test {len(split['train'])}/{len(split['validation'])}/{len(split['test'])}"
        + (f"; {ds.unlabelled} unlabelled rows left out" if ds.unlabelled else ""),
        f"  training {len(fitted.history.get('loss', []))} epochs in {fitted.seconds:.1f}s, best epoch {fitted.best_epoch}"
        + ("; balanced class weights (classes are imbalanced)" if fitted.class_weight else ""),
    ]
    for name in ("validation", "test"):
        if name in metrics:
            m = metrics[name]
            lines.append(f"  {name:10s} accuracy {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}  (n={m['n']})")
    if len(split["test"]):
        lines.append(f"  majority-class rate on test: {majority_rate(y[split['test']]):.3f}")
    lines.append(f"  files    model.keras, metrics.json, curves.png, confusion_matrix.png in {run_dir}")
    return "\n".join(lines)


def train(shards: str | os.PathLike, out: str | os.PathLike, *, verbose: int = 1, dataset: Dataset | None = None,
          **options) -> TrainResult:
    """Train a head on the shards in ``shards`` and write a complete run directory ``out`` atomically.

    Options are :class:`TrainOptions` fields (hidden, dropout, learning_rate, epochs, batch_size, patience,
    seed, val_fraction, test_fraction, class_weight, split_file).
    """
    from stage2_classify.plots import plot_confusion, plot_curves
    from stage2_classify.rundir import RunWriter

    opts = TrainOptions(**options)
    ds = dataset if dataset is not None else load_dataset(shards)
    split = make_split(ds, opts)
    if len(split["train"]) == 0:
        raise DatasetError(f"{shards}: no training rows after the split")
    fitted = fit_head(ds, split, opts, verbose=verbose)
    metrics = evaluate_splits(fitted.model, ds, split)
    metrics["majority_rate_test"] = majority_rate(ds.y[split["test"]]) if len(split["test"]) else None
    writer = RunWriter(out)
    try:
        writer.write_json("labels.json", ds.classes)
        (writer.tmp / "shard_metadata.json").write_text(ds.metadata.to_json())
        writer.write_json("config.json", {**dataclasses.asdict(opts), "shards": os.fspath(shards),
                                          "class_weight_used": fitted.class_weight})
        writer.write_json("metrics.json", metrics)
        writer.write_json("history.json", fitted.history)
        writer.write_json("split.json", {k: ds.paths[v].tolist() for k, v in split.items()})
        plot_curves(fitted.history, writer.path("curves.png"), fitted.best_epoch)
        cm_split = "test" if "test" in metrics else "validation" if "validation" in metrics else "train"
        plot_confusion(np.asarray(metrics[cm_split]["confusion_matrix"]), ds.classes,
                       writer.path("confusion_matrix.png"), title=f"confusion matrix ({cm_split})")
        fitted.model.save(writer.path("model.keras"))
        final = writer.commit({
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "classes": len(ds.classes),
            "train_seconds": round(fitted.seconds, 3),
            "epochs_run": len(fitted.history.get("loss", [])),
            "best_epoch": fitted.best_epoch,
        })
    except BaseException:
        writer.discard()
        raise
    summary = _summary(ds, split, fitted, metrics, str(final))
    if verbose:
        print(summary, flush=True)
    return TrainResult(str(final), metrics, fitted.history, ds.classes, summary)
