"""The one head definition that train, cv, sweep and pipeline compare share: --head auto, linear or mlp.

On frozen features a tuned logistic regression is as good as a small MLP unless labels are plentiful, and an
untuned MLP on a few hundred rows is worse (``bench/heads.py`` measures both against scikit-learn's tuned
probe). So:

- ``linear``: multinomial logistic regression on standardised vectors (``training/linear.py``, L-BFGS), its L2
  strength swept over ``L2_GRID`` (strongest first, each fit warm-started from the previous one; the sweep
  ends after ``GRID_PATIENCE`` values in a row that are no better) and chosen by validation macro-F1, ties
  broken by validation log-loss; then written as the Keras head with
  ``hidden=()`` (``head.linear_to_keras``), so ``model.keras`` is the same kind of file whatever was chosen.
- ``mlp``: the Keras MLP of ``opts.hidden`` (``fit.fit_mlp``), with the small-data settings of
  ``TrainOptions``: batch size scaled to the data, AdamW weight decay, early stopping on validation loss.
- ``auto`` (default): both; the MLP is kept only when it beats the linear head on validation by more than
  chance: the lower end of the 95% paired bootstrap interval of (MLP − linear) validation macro-F1 is above 0.
  On a validation split of ~100 images a gap of 0.03 is noise (``bench/heads.py``: the MLP that won on
  validation that way lost on test as often as not), so small sets keep the linear head; on large sets a real
  gain of the MLP is also a clear one. Without validation rows nothing can be
  chosen: the linear head with L2 ``DEFAULT_L2`` is fitted, and the choice says so.

``FittedHead.choice`` records the candidates' validation scores; the summary and ``metrics.json`` show it.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from stage2_classify.data.dataset import Dataset
from stage2_classify.options import L2_GRID, TrainOptions
from stage2_classify.evaluation.metrics import paired_difference
from stage2_classify.training.fit import FittedHead, class_weights, fit_mlp, predict_proba

DEFAULT_L2 = 1e-3  # the linear head's L2 strength when there is no validation split to choose one on
MAX_ITER = 300  # L-BFGS steps per L2 value (warm starts make later ones short)
GRID_PATIENCE = 3  # grid values in a row no better than the best so far end the sweep (weaker L2 costs most)


def validation_score(y: np.ndarray, proba: np.ndarray) -> tuple[float, float]:
    """(macro-F1 over the classes present, log-loss) of probabilities on validation rows: the head's choice."""
    from sklearn.metrics import f1_score, log_loss

    k = proba.shape[1]
    p = np.clip(np.asarray(proba, np.float64), 1e-7, 1.0)
    p /= p.sum(axis=1, keepdims=True)
    f1 = float(f1_score(y, p.argmax(axis=1), labels=np.unique(y), average="macro", zero_division=0))
    return f1, float(log_loss(y, p, labels=np.arange(k)))


def fit_linear_head(ds: Dataset, split: dict[str, np.ndarray], opts: TrainOptions) -> FittedHead:
    """The linear head, its L2 strength chosen on the validation split (see the module doc)."""
    from stage2_classify.training.head import linear_to_keras
    from stage2_classify.training.linear import fit_linear

    t0 = time.perf_counter()
    tr, va = split["train"], split.get("validation", np.zeros(0, np.int64))
    k = len(ds.classes)
    x, y = ds.features[tr], ds.y[tr]
    cw = class_weights(y, k, opts.class_weight)
    weights = None if cw is None else np.asarray([cw[c] for c in y])
    grid = L2_GRID if len(va) else (DEFAULT_L2,)
    best, best_key, tried, previous, since_best = None, None, [], None, 0
    for l2 in grid:
        previous = fit_linear(x, y, k, l2=l2, max_iter=MAX_ITER, sample_weight=weights, init=previous)
        if not len(va):
            best = (l2, previous)
            break
        f1, loss = validation_score(ds.y[va], previous.predict_proba(ds.features[va]))
        tried.append({"l2": l2, "val_macro_f1": f1, "val_log_loss": loss})
        if best_key is None or (-f1, loss) < best_key:
            best_key, best, since_best = (-f1, loss), (l2, previous), 0
        else:
            since_best += 1
            if since_best >= GRID_PATIENCE:
                break
    l2, fitted = best
    choice = {"l2": l2, "l2_grid": tried, "val_macro_f1": None if best_key is None else -best_key[0],
              "val_log_loss": None if best_key is None else best_key[1]}
    return FittedHead(linear_to_keras(fitted, k), {}, 0, time.perf_counter() - t0, cw, kind="linear",
                      choice={"head": "linear", "linear": choice})


def fit_head(ds: Dataset, split: dict[str, np.ndarray], opts: TrainOptions, progress: bool = True) -> FittedHead:
    """The head ``opts.head`` names, fitted on the train split and chosen on the validation split."""
    if opts.head == "linear" or not opts.hidden:
        return fit_linear_head(ds, split, opts)
    if opts.head == "mlp":
        fitted = fit_mlp(ds, split, opts, progress=progress)
        fitted.choice = {"head": "mlp", "mlp": _mlp_summary(ds, split, opts, fitted)}
        return fitted
    linear = fit_linear_head(ds, split, opts)
    if not len(split.get("validation", ())):
        linear.choice["note"] = "no validation rows: nothing to choose on, the linear head was kept"
        return linear
    mlp = fit_mlp(ds, split, opts, progress=progress)
    mlp_info = _mlp_summary(ds, split, opts, mlp)
    lin_info = linear.choice["linear"]
    va = split["validation"]
    gain = paired_difference(ds.y[va], predict_proba(linear.model, ds.features[va]).argmax(axis=1),
                             predict_proba(mlp.model, ds.features[va]).argmax(axis=1), len(ds.classes),
                             seed=opts.seed)
    mlp_info["gain_over_linear"] = gain
    keep_mlp = gain["ci95"] is not None and gain["ci95"][0] > 0
    kept = mlp if keep_mlp else linear
    return dataclasses.replace(
        kept, history=mlp.history, best_epoch=mlp.best_epoch, seconds=linear.seconds + mlp.seconds,
        choice={"head": "mlp" if keep_mlp else "linear", "linear": lin_info, "mlp": mlp_info, "rule": "auto"})


def _mlp_summary(ds: Dataset, split, opts: TrainOptions, fitted: FittedHead) -> dict:
    from stage2_classify.training.fit import auto_batch_size

    va = split.get("validation", np.zeros(0, np.int64))
    f1 = loss = None
    if len(va):
        f1, loss = validation_score(ds.y[va], predict_proba(fitted.model, ds.features[va]))
    return {"hidden": list(opts.hidden), "batch_size": opts.batch_size or auto_batch_size(len(split["train"])),
            "weight_decay": opts.weight_decay, "epochs": len(fitted.history.get("loss", [])),
            "best_epoch": fitted.best_epoch, "val_macro_f1": f1, "val_log_loss": loss}


def describe_choice(choice: dict | None) -> str:
    """One line for the summary: what was kept and both validation scores."""
    if not choice:
        return ""
    lin, mlp = choice.get("linear"), choice.get("mlp")

    def f(v):
        return "-" if v is None else f"{v:.3f}"
    parts = []
    if lin:
        parts.append(f"linear (L2 {lin['l2']:g}) {f(lin['val_macro_f1'])}")
    if mlp:
        parts.append(f"MLP {'x'.join(map(str, mlp['hidden']))} {f(mlp['val_macro_f1'])}")
    text = f"{choice['head']} head kept" + (f"; validation macro-F1 {', '.join(parts)}" if parts else "")
    if choice.get("rule") == "auto":
        gain = (mlp or {}).get("gain_over_linear") or {}
        ci = gain.get("ci95")
        text += (f" (auto: the MLP only when it beats the linear head beyond chance; MLP − linear "
                 f"{gain['difference']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}])" if ci else
                 " (auto: the MLP only when it beats the linear head beyond chance)")
    return text + (f"; {choice['note']}" if choice.get("note") else "")
