"""Stage 2: a Keras 3 dense classifier (torch backend) trained on stage 1's cached feature shards.

Public API::

    from stage2_classify import train, evaluate, predict, sweep, cross_validate
    result = train("features/", "runs/first")          # model.keras, metrics.json, split.csv, plots
    evaluate("other_features/", "runs/first")          # metrics on labelled shards (warns if not held out)
    predict("new_features/", "runs/first", "preds.csv")
    rows = sweep("features/", "sweeps/a", hidden=[(), (256,), (512,)], dropout=[0.2, 0.4])
    cv = cross_validate("features/", "cv/a", folds=5)  # out-of-fold probabilities for every image

It reads only Parquet shards through ``shardformat`` (``docs/shard-format.md``), never images.
Keras runs on its torch backend: importing this package sets ``KERAS_BACKEND=torch`` unless it is set.
Keras and torch load on first use, so ``stage2-classify --help`` is instant.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")
# OpenMP threads that spin while waiting (the default) stall for whole scheduler slices when another
# process (stage 1, a second training) holds a core: training measured 5-50x slower on a busy 2-core
# machine (docs/stage2.md). Only takes effect if torch is not imported yet; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_BACKEND_HELP = ("stage2_classify needs Keras' 'torch' backend. Set KERAS_BACKEND=torch (or leave it unset) "
                 "before keras is imported, or import stage2_classify before keras.")


class BackendError(RuntimeError):
    """Keras is (or would be) running on another backend than torch."""


def _check_backend() -> None:
    """Raise :class:`BackendError` unless Keras runs (or will run) on torch; imports keras if needed."""
    if "keras" not in sys.modules:
        wanted = os.environ.get("KERAS_BACKEND", "torch")
        if wanted != "torch":
            raise BackendError(f"KERAS_BACKEND is {wanted!r}. {_BACKEND_HELP}")
    import keras

    if keras.backend.backend() != "torch":
        raise BackendError(f"Keras was already imported with the {keras.backend.backend()!r} backend. {_BACKEND_HELP}")


if "keras" in sys.modules:  # imported before us: refuse now rather than fail obscurely at training time
    _check_backend()

# Eager on purpose: the functions must shadow the submodules of the same name (train, predict, sweep).
# None of these imports keras or torch at module level, so ``stage2-classify --help`` stays fast.
from stage2_classify.data import Dataset, DatasetError, load_dataset  # noqa: E402
from stage2_classify.rundir import RunDirError  # noqa: E402
from stage2_classify.train import TrainOptions, TrainResult, train  # noqa: E402
from stage2_classify.predict import EvaluationResult, evaluate, load_run, predict  # noqa: E402
from stage2_classify.sweep import sweep  # noqa: E402
from stage2_classify.cv import CVResult, cross_validate  # noqa: E402

__all__ = ["BackendError", "CVResult", "Dataset", "DatasetError", "EvaluationResult", "RunDirError", "TrainOptions",
           "TrainResult", "cross_validate", "evaluate", "load_dataset", "load_run", "predict", "sweep", "train"]
