"""Stage 2: a Keras 3 dense classifier (torch backend) trained on stage 1's cached feature shards.

Public API::

    from stage2_classify import Classifier, train, evaluate, predict, sweep, cross_validate
    result = train("features/", "runs/first")          # model.keras, metrics.json, split.csv, ood.npz, plots
    evaluate("other_features/", "runs/first")          # metrics on labelled shards (warns if not held out)
    clf = Classifier.load("runs/first")                # predict (DataFrame), evaluate, export (one ONNX file)
    df = clf.predict("new_photos/")                    # images, shards or vectors; top-k and an 'unknown' flag
    predict("new_features/", "runs/first", "preds.csv")
    rows = sweep("features/", "sweeps/a", hidden=[(), (256,), (512,)], dropout=[0.2, 0.4])
    cv = cross_validate("features/", "cv/a", folds=5)  # out-of-fold probabilities for every image
    ft = finetune("runs/first", "runs/tuned", input_size=128)  # the backbone fine-tuned end to end (LP-FT)

Training reads only Parquet shards through ``shardformat`` (``docs/shard-format.md``), never images;
prediction on images has them extracted by stage 1's public ``stage1_extract.extract``.
Keras runs on its torch backend: importing this package sets ``KERAS_BACKEND=torch`` unless it is set.
Keras and torch load on first use, so ``stage2-classify --help`` is instant.

Layout (one subpackage per concern): ``data/`` (shards → Dataset, splits, split files), ``training/`` (the head,
fitting, ``train``, ``sweep``, ``cross_validate``), ``runs/`` (the run directory: writing, its files, loading),
``inference/`` (``Classifier``, inputs from images or shards, the open-set flag, ONNX export), ``evaluation/``
(metrics, calibration, ``evaluate``), ``doctor/`` (the data doctor), ``reports/`` (HTML reports, plots),
``cli/`` (``stage2-classify``); ``options.py`` (every option once), ``errors.py`` (``Stage2Error`` and its
children), ``backend.py`` (the torch-backend check).
"""

from __future__ import annotations

import os

# Process-wide on purpose, and only as defaults (a value the user set wins): Keras reads KERAS_BACKEND when it is
# first imported, so it must be set before any ``import keras``; stage 2 runs on torch only.
os.environ.setdefault("KERAS_BACKEND", "torch")
# OpenMP threads that spin while waiting (the default) stall for whole scheduler slices when another
# process (stage 1, a second training) holds a core: training measured 5-50x slower on a busy 2-core
# machine (docs/stage2.md). Only takes effect if torch is not imported yet; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from stage2_classify.backend import check_backend, keras_already_imported  # noqa: E402
from stage2_classify.errors import (BackendError, DatasetError, DoctorError, ExportError, RunDirError,  # noqa: E402
                                    Stage2Error)

if keras_already_imported():
    # imported (or tried) before us: refuse now rather than fail obscurely at training time
    check_backend()

# None of these imports keras or torch at module level, so ``stage2-classify --help`` stays fast.
from stage2_classify.options import TrainOptions  # noqa: E402
from stage2_classify.data.dataset import Dataset, load_dataset  # noqa: E402
from stage2_classify.training.trainer import TrainResult, train  # noqa: E402
from stage2_classify.training.sweep import sweep  # noqa: E402
from stage2_classify.training.cv import CVResult, cross_validate  # noqa: E402
from stage2_classify.runs.load import load_run  # noqa: E402
from stage2_classify.evaluation.evaluate import EvaluationResult, evaluate  # noqa: E402
from stage2_classify.inference.classifier import Classifier  # noqa: E402
from stage2_classify.inference.predict import predict  # noqa: E402
from stage2_classify.finetuning.options import FinetuneOptions  # noqa: E402
from stage2_classify.finetuning.api import FinetuneResult, finetune  # noqa: E402

__all__ = ["BackendError", "CVResult", "Classifier", "Dataset", "DatasetError", "DoctorError", "EvaluationResult",
           "ExportError", "FinetuneOptions", "FinetuneResult", "RunDirError", "Stage2Error", "TrainOptions", "TrainResult", "check_backend",
           "cross_validate", "evaluate", "finetune", "load_dataset", "load_run", "predict", "sweep", "train"]
