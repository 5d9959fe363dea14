"""Training: load shards → content-keyed split → fit the head with early stopping → metrics, files, model."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from typing import Sequence

import numpy as np

from stage2_classify.data import Dataset, DatasetError, load_dataset
from stage2_classify.metrics import classification_metrics, format_metric, majority_rate
from stage2_classify.split import content_split, split_notes
from stage2_classify.splitfile import split_from_file

IMBALANCE_RATIO = 1.5  # class_weight="auto" balances when the largest class is more than this × the smallest


@dataclasses.dataclass
class TrainOptions:
    """Everything that decides a trained head (written to ``config.json``)."""

    hidden: Sequence[int] = (256,)  # () = linear head
    dropout: float = 0.3
    learning_rate: float = 1e-3
    epochs: int = 50
    batch_size: int = 256
    patience: int = 5  # early stopping on validation loss; the best epoch's weights are restored
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    class_weight: str = "auto"  # auto | balanced | none
    split_file: str | None = None  # a run's split.csv, or CSV/Parquet with columns path, split (train/val/test)
    matmul_precision: str = "highest"  # torch float32 matmuls: "high"/"medium" allow TF32 (GPU) or bf16 (CPU)

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        if any(h <= 0 for h in self.hidden):
            raise ValueError(f"hidden sizes must be positive, got {self.hidden} (use () or 0 for a linear head)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning rate must be positive, got {self.learning_rate}")
        if self.class_weight not in ("auto", "balanced", "none"):
            raise ValueError(f"class_weight must be auto, balanced or none, not {self.class_weight!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 0:
            raise ValueError("epochs and batch_size must be at least 1, patience at least 0")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise ValueError(f"val_fraction ({self.val_fraction}) and test_fraction ({self.test_fraction}) must be "
                             "in [0, 1) and sum to less than 1")
        if self.matmul_precision not in ("highest", "high", "medium"):
            raise ValueError(f"matmul_precision must be highest, high or medium, not {self.matmul_precision!r}")
        if self.split_file is not None:
            self.split_file = os.fspath(self.split_file)


@dataclasses.dataclass
class TrainResult:
    run_dir: str
    metrics: dict  # per split: accuracy, balanced_accuracy, macro_f1, per_class, ci95, … (see metrics.py)
    history: dict  # per epoch: loss, accuracy, val_loss, val_accuracy
    classes: list[str]
    model: object = dataclasses.field(default=None, repr=False)  # the trained keras.Model (also in run_dir)
    text: str = dataclasses.field(default="", repr=False)

    def format(self) -> str:
        """The human summary printed at the end of training."""
        return self.text

    @property
    def summary(self) -> str:
        return self.format()


@dataclasses.dataclass
class FittedHead:
    model: object
    history: dict
    best_epoch: int
    seconds: float
    class_weight: dict | None


def class_weights(y: np.ndarray, n_classes: int, mode: str) -> dict | None:
    """Balanced weights n / (k · n_c) over the k classes present; ``auto`` applies them only when the largest
    class has more than ``IMBALANCE_RATIO`` × the rows of the smallest."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    if mode == "none" or not present.any():
        return None
    if mode == "auto" and counts[present].max() / counts[present].min() <= IMBALANCE_RATIO:
        return None
    weights = np.where(present, counts.sum() / (present.sum() * np.maximum(counts, 1)), 0.0)
    return {i: float(w) for i, w in enumerate(weights)}


def make_split(ds: Dataset, opts: TrainOptions) -> dict[str, np.ndarray]:
    """The split file's split when one is given, else the content-keyed split (``split.py``)."""
    if opts.split_file:
        return split_from_file(ds.paths, opts.split_file, content_ids=ds.content_ids)
    return content_split(ds.content_ids, ds.y, ds.groups, val_fraction=opts.val_fraction,
                         test_fraction=opts.test_fraction, seed=opts.seed)


def split_info(opts: TrainOptions) -> dict:
    if opts.split_file:
        return {"method": "file", "split_file": os.path.abspath(opts.split_file)}
    return {"method": "content-hash", "seed": opts.seed, "val_fraction": opts.val_fraction,
            "test_fraction": opts.test_fraction}


def column_stats(x: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and variance in float64, two passes in chunks (no full-size temporary)."""
    n = len(x)
    total = np.zeros(x.shape[1], np.float64)
    for s in range(0, n, chunk):
        total += x[s:s + chunk].sum(axis=0, dtype=np.float64)
    mean = total / max(n, 1)
    sq = np.zeros_like(total)
    for s in range(0, n, chunk):
        d = x[s:s + chunk] - mean.astype(np.float32)
        sq += np.einsum("ij,ij->j", d, d, dtype=np.float64)
    return mean, sq / max(n, 1)


@contextlib.contextmanager
def matmul_precision(precision: str):
    """Torch's float32 matmul precision for the duration of a fit (restored afterwards).

    "highest" is plain float32. "medium" lets oneDNN use bfloat16 on CPUs that have it (AVX512-BF16/AMX:
    about 2.5x faster matmuls on this project's benchmark machine) and TF32 on NVIDIA GPUs; on CPUs without
    bf16 units it can be slower. Predictions always run at the default precision.
    """
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def fit_head(ds: Dataset, split: dict[str, np.ndarray], opts: TrainOptions, progress: bool = False) -> FittedHead:
    """Fit one head on the train split, early-stopping on validation loss with the best weights restored.

    ``progress``: Keras' progress bar on a terminal, one line per epoch otherwise.
    """
    from stage2_classify import _check_backend

    _check_backend()
    import keras

    from stage2_classify.model import build_head

    keras.utils.set_random_seed(opts.seed)
    tr, va = split["train"], split["validation"]
    x_train, y_train = ds.features[tr], ds.y[tr]
    mean, variance = column_stats(x_train)
    model = build_head(ds.features.shape[1], len(ds.classes), hidden=opts.hidden, dropout=opts.dropout,
                       learning_rate=opts.learning_rate, mean=mean, variance=variance)
    has_val = len(va) > 0
    monitor = "val_loss" if has_val else "loss"
    callbacks = [keras.callbacks.EarlyStopping(monitor=monitor, patience=opts.patience, restore_best_weights=True)]
    cw = class_weights(y_train, len(ds.classes), opts.class_weight)
    t0 = time.perf_counter()
    with matmul_precision(opts.matmul_precision):
        hist = model.fit(
            x_train, y_train,
            validation_data=(ds.features[va], ds.y[va]) if has_val else None,
            epochs=opts.epochs, batch_size=opts.batch_size, shuffle=True,
            class_weight=cw, callbacks=callbacks, verbose=keras_verbosity(progress),
        )
    seconds = time.perf_counter() - t0
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    series = history.get(monitor) or [0.0]
    return FittedHead(model, history, int(np.nanargmin(series)) + 1, seconds, cw)


def predict_proba(model, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    if len(features) == 0:
        return np.zeros((0, int(model.outputs[0].shape[-1])), np.float32)
    return np.asarray(model.predict(features, batch_size=batch_size, verbose=0), dtype=np.float32)


def metrics_by_split(ds: Dataset, proba: np.ndarray, split: dict[str, np.ndarray], seed: int = 0) -> dict:
    """Metrics per non-empty split from probabilities for every row; bootstrap intervals on validation and test."""
    out = {}
    for name in ("train", "validation", "test"):
        idx = split.get(name, np.zeros(0, np.int64))
        if len(idx):
            out[name] = classification_metrics(ds.y[idx], proba[idx], ds.classes, bootstrap=name != "train",
                                               seed=seed)
    return out


def evaluate_splits(model, ds: Dataset, split: dict[str, np.ndarray]) -> dict:
    """Metrics per split of a fitted model (predicts only the rows in a split)."""
    rows = np.concatenate([split.get(k, np.zeros(0, np.int64)) for k in ("train", "validation", "test")])
    proba = np.zeros((len(ds.y), len(ds.classes)), np.float32)
    proba[rows] = predict_proba(model, ds.features[rows])
    return metrics_by_split(ds, proba, split)


def _summary(ds: Dataset, split, fitted: FittedHead, metrics: dict, run_dir: str, notes: list[str],
             info: dict) -> str:
    n_split = "/".join(str(len(split.get(k, ()))) for k in ("train", "validation", "test"))
    how = (f"frozen split from {info['split_file']}" if info["method"] == "file"
           else f"content-keyed split, seed {info['seed']}")
    lines = [
        f"stage 2 done: {run_dir}",
        f"  data       {len(ds.y)} labelled vectors ({ds.metadata.backbone}, {ds.features.shape[1]}-d), "
        f"{len(ds.classes)} classes; train/val/test {n_split} ({how})"
        + (f"; {ds.unlabelled} unlabelled row{'s' if ds.unlabelled != 1 else ''} left out" if ds.unlabelled else ""),
        f"  training   {len(fitted.history.get('loss', []))} epochs in {fitted.seconds:.1f}s, best epoch "
        f"{fitted.best_epoch} (weights restored)"
        + ("; balanced class weights (classes are imbalanced)" if fitted.class_weight else ""),
    ]
    for name in ("validation", "test"):
        if name in metrics:
            m = metrics[name]
            lines.append(f"  {name:11s}" + "  ".join(format_metric(m, k, label) for k, label in (
                ("accuracy", None), ("balanced_accuracy", "balanced"), ("macro_f1", "macro-F1"))) + f"  (n={m['n']})")
    if "test" in metrics:
        m = metrics["test"]
        lines.append("  test       " + "  ".join(
            f"{label} {m[k]:.3f}" for k, label in (("roc_auc_ovr", "ROC AUC"), ("log_loss", "log-loss"), ("ece", "ECE"))
            if m.get(k) is not None) + "  (95% bootstrap intervals in [ ])")
        lines.append(f"  baseline   majority-class rate on test {majority_rate(ds.y[split['test']]):.3f}")
    if ds.duplicate_rows_dropped:
        lines.append(f"  note       {ds.duplicate_rows_dropped} shard rows repeated a path and were read once "
                     "(rerun stage1-extract to repair the shards)")
    lines += [f"  note       {note}" for note in notes]
    lines.append("  files      report.html (open it in a browser), model.keras, metrics.json, predictions.parquet, "
                 "split.csv, curves.png, confusion_matrix.png, reliability.png")
    return "\n".join(lines)


def keras_verbosity(progress: bool) -> int:
    """Keras verbosity for ``progress``: a progress bar on a terminal, one line per epoch in a log, or silence."""
    if not progress:
        return 0
    return 1 if sys.stdout.isatty() else 2


def train(
    shards: str | os.PathLike,
    out: str | os.PathLike,
    *,
    hidden: Sequence[int] = (256,),
    dropout: float = 0.3,
    learning_rate: float = 1e-3,
    epochs: int = 50,
    batch_size: int = 256,
    patience: int = 5,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    class_weight: str = "auto",
    split_file: str | os.PathLike | None = None,
    matmul_precision: str = "highest",
    dataset: Dataset | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a head on the shards in ``shards`` and write a complete run directory ``out`` atomically.

    The split is keyed by content (``split_file``: a run's ``split.csv`` to reuse its split exactly); see
    :class:`TrainOptions` for the other parameters. ``progress`` shows Keras' progress and prints the summary
    (``result.format()``). Pass ``dataset=load_dataset(shards)`` to reuse vectors already in memory.
    """
    opts = TrainOptions(hidden=hidden, dropout=dropout, learning_rate=learning_rate, epochs=epochs,
                        batch_size=batch_size, patience=patience, seed=seed, val_fraction=val_fraction,
                        test_fraction=test_fraction, class_weight=class_weight, split_file=split_file,
                        matmul_precision=matmul_precision)
    return train_with_options(shards, out, opts, dataset=dataset, progress=progress)


def train_with_options(shards, out, opts: TrainOptions, *, dataset: Dataset | None = None,
                       progress: bool = True) -> TrainResult:
    """:func:`train` with the options as one :class:`TrainOptions` (used by ``sweep`` and ``pipeline``)."""
    from stage2_classify import _check_backend
    from stage2_classify.rundir import RunWriter
    from stage2_classify.runfiles import write_run

    _check_backend()  # before minutes of loading, not after
    ds = dataset if dataset is not None else load_dataset(shards)
    split = make_split(ds, opts)
    if len(split["train"]) == 0:
        raise DatasetError(f"{os.fspath(shards)}: no training rows after the split")
    notes = split_notes(ds.y, ds.classes, split, ds.content_ids, ds.groups, from_file=bool(opts.split_file))
    fitted = fit_head(ds, split, opts, progress=progress)
    proba = predict_proba(fitted.model, ds.features)
    metrics = metrics_by_split(ds, proba, split, seed=opts.seed)
    metrics["majority_rate_test"] = majority_rate(ds.y[split["test"]]) if len(split["test"]) else None
    metrics["classes"] = ds.classes
    info = split_info(opts)
    writer = RunWriter(out)
    try:
        final = write_run(writer, shards=shards, ds=ds, split=split, notes=notes, opts=opts, fitted=fitted,
                          metrics=metrics, proba=proba, split_info=info)
    except BaseException:
        writer.discard()
        raise
    text = _summary(ds, split, fitted, metrics, str(final), notes, info)
    if progress:
        print(text, flush=True)
    return TrainResult(str(final), metrics, fitted.history, ds.classes, fitted.model, text)
