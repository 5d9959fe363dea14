"""Fitting one head: class weights, the split, standardisation statistics, early-stopped Keras fit, metrics.

The pieces ``train``, ``sweep`` and ``cross_validate`` share; ``trainer.py`` puts them together into a run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time

import numpy as np

from stage2_classify.backend import check_backend
from stage2_classify.data.dataset import Dataset
from stage2_classify.data.split import content_split
from stage2_classify.data.splitfile import split_from_file
from stage2_classify.evaluation.metrics import classification_metrics
from stage2_classify.options import IMBALANCE_RATIO, TrainOptions


@dataclasses.dataclass
class FittedHead:
    model: object
    history: dict  # the MLP's per-epoch curves ({} when no MLP was fitted)
    best_epoch: int  # the MLP's (0 when no MLP was fitted)
    seconds: float
    class_weight: dict | None
    kind: str = "mlp"  # what model.keras holds: "linear" or "mlp"
    choice: dict | None = None  # how it was chosen (training/heads.py): validation scores of the candidates


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
    """The split file's split when one is given, else the content-keyed split (``data/split.py``)."""
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


def auto_batch_size(n_train: int) -> int:
    """``batch_size=0``: about n/16 rows per step, a power of two within 16..256 (600 rows → 32: ~13 steps an
    epoch, where a batch of 256 gave two and early stopping had nothing to go on)."""
    return int(np.clip(2 ** round(np.log2(max(n_train, 1) / 16)), 16, 256))


def fit_mlp(ds: Dataset, split: dict[str, np.ndarray], opts: TrainOptions, progress: bool = True) -> FittedHead:
    """Fit the Keras MLP (``opts.hidden``) on the train split, early-stopping on validation loss with the best
    weights restored. Which head to fit is decided in ``training/heads.py``; use its ``fit_head``.

    ``progress``: Keras' progress bar on a terminal, one line per epoch otherwise.
    """
    check_backend()
    import keras

    from stage2_classify.training.head import build_head

    # Process-wide on purpose: Keras' initialisers, dropout and shuffling draw from its global seed generator
    # and torch's RNG, so this is what makes "same seed, same numbers" hold. It also reseeds Python's ``random``
    # and NumPy's global generator (stage 2 itself uses seeded ``default_rng`` objects only).
    keras.utils.set_random_seed(opts.seed)
    tr, va = split["train"], split["validation"]
    x_train, y_train = ds.features[tr], ds.y[tr]
    mean, variance = column_stats(x_train)
    model = build_head(ds.features.shape[1], len(ds.classes), hidden=opts.hidden, dropout=opts.dropout,
                       learning_rate=opts.learning_rate, mean=mean, variance=variance,
                       weight_decay=opts.weight_decay)
    has_val = len(va) > 0
    monitor = "val_loss" if has_val else "loss"
    callbacks = [keras.callbacks.EarlyStopping(monitor=monitor, patience=opts.patience, restore_best_weights=True)]
    cw = class_weights(y_train, len(ds.classes), opts.class_weight)
    t0 = time.perf_counter()
    with matmul_precision(opts.matmul_precision):
        hist = model.fit(
            x_train, y_train,
            validation_data=(ds.features[va], ds.y[va]) if has_val else None,
            epochs=opts.epochs, batch_size=opts.batch_size or auto_batch_size(len(tr)), shuffle=True,
            class_weight=cw, callbacks=callbacks, verbose=keras_verbosity(progress),
        )
    seconds = time.perf_counter() - t0
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    series = history.get(monitor) or [0.0]
    return FittedHead(model, history, int(np.nanargmin(series)) + 1, seconds, cw,
                      kind="mlp" if opts.hidden else "linear")


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


def keras_verbosity(progress: bool) -> int:
    """Keras verbosity for ``progress``: a progress bar on a terminal, one line per epoch in a log, or silence."""
    if not progress:
        return 0
    return 1 if sys.stdout.isatty() else 2
