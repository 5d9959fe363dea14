"""Stage 2: a Keras 3 dense classifier (torch backend) trained on stage 1's cached feature shards.

Public API::

    from stage2_classify import train, evaluate, predict, sweep
    result = train("features/", "runs/first")          # model.keras, metrics.json, plots
    predict("new_features/", "runs/first", "preds.csv")

It reads only Parquet shards through ``shardformat`` (``docs/shard-format.md``), never images.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")


def _check_backend() -> None:
    import keras

    if keras.backend.backend() != "torch":
        raise RuntimeError(
            f"Keras was already imported with the {keras.backend.backend()!r} backend; stage2_classify needs "
            "'torch'. Set KERAS_BACKEND=torch before importing keras (or import stage2_classify first)."
        )


from stage2_classify.train import TrainOptions, TrainResult, train  # noqa: E402
from stage2_classify.predict import evaluate, load_run, predict  # noqa: E402
from stage2_classify.sweep import sweep  # noqa: E402

__all__ = ["TrainOptions", "TrainResult", "evaluate", "load_run", "predict", "sweep", "train"]
