"""A trained run as one object, the way a notebook wants it::

    from stage2_classify import Classifier
    clf = Classifier.load("work/runs/first")
    df = clf.predict("new_photos/")              # images: a file, a folder, a file list or a list of paths
    df = clf.predict("work/features/new")        # or a shard directory, or an (n, D) array of vectors
    clf.evaluate("work/features/held_out")       # metrics on labelled shards
    clf.export("model.onnx")                     # one ONNX file from uint8 pixels to probabilities

Predictions come back as a pandas DataFrame with one row per input: ``path`` (as given), ``label`` (when
the input has labels), ``predicted``, ``probability``, ``top1_label``/``top1_probability`` … ``topK_…``,
``unknown`` (the open-set flag, :mod:`stage2_classify.inference.ood`), ``ood_score`` and ``error`` (why an image has
no prediction: unreadable, not an image…; null otherwise).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from hybrid_common import renamed_keywords
from stage2_classify.inference import inputs as _inputs
from stage2_classify.options import PredictOptions
from stage2_classify.runs.load import load_run


class Classifier:
    """A loaded run directory: the Keras head, its classes, the stage-1 metadata and the open-set detector."""

    def __init__(self, run) -> None:
        self._run = run
        self._ood = None
        self._ood_note: str | None = None  # None: not looked up yet

    @classmethod
    @renamed_keywords(run_dir="run", model="run", model_dir="run")
    def load(cls, run: str | os.PathLike) -> "Classifier":
        """Load a complete run directory (Keras safe mode: no code, nothing unpickled)."""
        return cls(load_run(run))

    @property
    def run_dir(self) -> Path:
        return self._run.path

    @property
    def classes(self) -> list[str]:
        return list(self._run.classes)

    @property
    def metadata(self):
        """The :class:`shardformat.ShardMetadata` of the vectors the head was trained on (backbone, weights…)."""
        return self._run.metadata

    @property
    def backbone_weights(self):
        """A fine-tuned run's own backbone (its directory), used when no ``weights`` are given; else None."""
        return getattr(self._run, "weights", None)

    @property
    def model(self):
        """The Keras model: raw (n, D) float32 vectors in, class probabilities out."""
        return self._run.model

    @property
    def ood(self):
        """The open-set detector (:class:`stage2_classify.inference.ood.OpenSetDetector`), or None when unavailable
        (see :attr:`ood_note`). Runs trained before it existed get it fitted from their training shards."""
        if self._ood_note is None:
            from stage2_classify.inference.ood import for_run

            self._ood, self._ood_note = for_run(self.run_dir, self.classes, self.metadata)
        return self._ood

    @property
    def ood_note(self) -> str:
        """Why the ``unknown`` flag is unavailable; empty when it is available."""
        self.ood  # noqa: B018  (looks it up)
        return self._ood_note or ""

    @renamed_keywords(shards="features")
    def calibrate_ood(self, features: str | os.PathLike, *, quantile: float = 0.95):
        """Fit the open-set detector on the labelled feature folder ``features`` (an 85/15 split by content: fit /
        calibrate) and store it in the run directory; for runs whose training shards are no longer where they
        were."""
        from stage2_classify.data.dataset import load_dataset
        from stage2_classify.data.split import content_split
        from stage2_classify.inference.ood import FILE, fit

        ds = load_dataset(features, expect=self.metadata)
        index = {c: i for i, c in enumerate(self.classes)}
        known = np.asarray([c in index for c in ds.classes])[ds.y]
        y = np.asarray([index.get(c, -1) for c in ds.classes], np.int64)[ds.y][known]
        x = ds.features[known]
        split = content_split(ds.content_ids[known], y, ds.groups[known], val_fraction=0.15, test_fraction=0.0)
        detector = fit(x[split["train"]], y[split["train"]], len(self.classes), x[split["validation"]],
                       quantile=quantile)
        detector.info["calibrated_from"] = os.fspath(features)
        detector.save(self.run_dir / FILE)
        self._ood, self._ood_note = detector, ""
        return detector

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities (n, C) for raw feature vectors, columns in :attr:`classes` order."""
        from stage2_classify.training.fit import predict_proba

        return predict_proba(self.model, np.asarray(features, np.float32))

    @renamed_keywords(features_dir="features")
    def resolve(self, inputs, *, features=None, weights=None, onnx=None, progress: bool = True,
                extract_fn=None, **stage1_options) -> _inputs.Resolved:
        """Turn ``inputs`` into vectors made like the training ones (see :meth:`predict` for what is accepted)."""
        if isinstance(inputs, np.ndarray):
            return _inputs.from_features(inputs, self.metadata)
        if hasattr(inputs, "features") and hasattr(inputs, "paths"):  # a shardformat.FeatureSet
            n = len(inputs.paths)
            return _inputs.Resolved(list(inputs.paths), list(inputs.labels), np.ones(n, bool),
                                    np.asarray(inputs.features, np.float32), [None] * n)
        if not isinstance(inputs, (list, tuple)) and _inputs.is_shard_dir(inputs):
            return _inputs.from_shards(inputs, self.metadata)
        weights = weights if weights is not None else self.backbone_weights
        return _inputs.from_images(inputs, self.metadata, features=features, weights=weights, onnx=onnx,
                                   progress=progress, extract_fn=extract_fn, **stage1_options)

    @renamed_keywords(features_dir="features")
    def predict(self, inputs, *, top_k: int = PredictOptions.top_k, out: str | os.PathLike | None = None,
                all_probabilities: bool = PredictOptions.all_probabilities,
                features: str | os.PathLike | None = None,
                weights: str | os.PathLike | None = None, onnx: str | os.PathLike | None = None,
                progress: bool = True, extract_fn=None, **stage1_options):
        """Predict on images or vectors; returns a pandas DataFrame (also written to ``out`` when given).

        ``inputs``: one image file, a folder (flat or class folders), a CSV/TSV/Parquet file list with a
        ``path`` column, a list of image paths, a shard directory (``part-*.parquet``, or a URI), a
        ``shardformat.FeatureSet`` or an (n, D) array. Images are extracted with the run's own backbone into
        a per-backbone cache (``features`` to choose the feature folder; ``stage1_options`` such as
        ``batch_size``, ``provider`` or ``workers`` go to ``stage1_extract.extract``). ``out`` ending in
        ``.csv`` is written as CSV, anything else as Parquet, atomically. ``all_probabilities`` adds one
        ``prob_<class>`` column per class.
        """
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        rows = self.resolve(inputs, features=features, weights=weights, onnx=onnx, progress=progress,
                            extract_fn=extract_fn, **stage1_options)
        probs = self.predict_proba(rows.features)
        detector = self.ood
        scores = detector.score(rows.features) if detector is not None else None
        if detector is None and progress:
            print(f"note: {self.ood_note}", file=sys.stderr)
        frame = prediction_frame(rows, probs, self.classes, top_k, scores, detector, all_probabilities)
        if out is not None:
            write_predictions(frame, out)
        failed = int((~rows.ok).sum())
        if failed and progress:
            print(f"note: {failed} of {len(rows.ok)} inputs could not be used (see the 'error' column)",
                  file=sys.stderr)
        return frame

    @renamed_keywords(features_dir="features")
    def evaluate(self, inputs, *, features=None, weights=None, onnx=None, progress: bool = True,
                 **kwargs):
        """Metrics on every labelled row of ``inputs``: labelled shards, or labelled images (a class-folder
        tree or a file list with a ``label`` column), extracted into the feature cache first. Returns an
        :class:`stage2_classify.EvaluationResult`; ``out`` writes the metrics as JSON too; ``progress`` shows the
        extraction and prints the summary."""
        from stage2_classify.evaluation.evaluate import evaluate

        shards = inputs
        if isinstance(inputs, (list, tuple)) or not _inputs.is_shard_dir(inputs):
            weights = weights if weights is not None else self.backbone_weights
            shards = _inputs.from_images(inputs, self.metadata, features=features, weights=weights,
                                         onnx=onnx, progress=progress).features_dir
        return evaluate(shards, self.run_dir, progress=progress, **kwargs)

    def export(self, out: str | os.PathLike, *, precision: str = "fp32", images=None, **kwargs):
        """Write one ONNX model from uint8 pixels to probabilities, verified against this classifier
        (see :func:`stage2_classify.inference.export.export`)."""
        from stage2_classify.inference.export import export

        return export(self, out, precision=precision, images=images, **kwargs)

    def predict_groups(self, inputs, *, groups=None, group_regex: str | None = None, **kwargs):
        """Per-group predictions (e.g. one row per patient): :meth:`predict` on ``inputs``, then the mean of each
        group's image probabilities (:func:`stage2_classify.evaluation.groups.predictions_by_group`). ``groups``:
        path → group mapping or one entry per row; ``group_regex``: one capture group searched in each path;
        neither: the groups stage 1 recorded in the shards, where the input is shards. Returns (images, groups)."""
        from stage2_classify.evaluation.groups import predictions_by_group

        frame = self.predict(inputs, all_probabilities=True, **kwargs)
        if groups is None and group_regex is None and "group" in frame.columns:
            groups = frame["group"].tolist()
        return frame, predictions_by_group(frame, groups=groups, group_regex=group_regex)

    def finetune(self, out: str | os.PathLike, *, images=None, **kwargs) -> "Classifier":
        """Fine-tune this run's backbone end to end from its head (LP-FT) into the run directory ``out``, and
        load it (see :func:`stage2_classify.finetuning.api.finetune` for the options)."""
        from stage2_classify.finetuning.api import finetune

        return Classifier.load(finetune(self.run_dir, out, images=images, **kwargs).run_dir)

    def explain(self, images, *, target: str = "predicted", **kwargs):
        """Heatmaps of what each prediction looked at (CAM / closed-form Grad-CAM), one DataFrame row per image
        (see :func:`stage2_classify.inference.explain.explain`); a fine-tuned run uses its own backbone weights."""
        from stage2_classify.inference.explain import explain
        return explain(self, images, target=target, **kwargs)

    def __repr__(self) -> str:
        return (f"Classifier({os.fspath(self.run_dir)!r}, {len(self.classes)} classes, "
                f"backbone={self.metadata.backbone}, dim={self.metadata.feature_dim})")


def prediction_frame(rows: _inputs.Resolved, probs: np.ndarray, classes: list[str], top_k: int, scores, detector,
                     all_probabilities: bool):
    """The predictions table (also :mod:`~stage2_classify.inference.few`'s); rows without a vector keep their
    path and error, with null predictions."""
    import pandas as pd

    n, k = len(rows.ok), min(top_k, len(classes))
    names = np.asarray(classes, dtype=object)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]

    def spread(values, dtype):  # per-usable-row values → one per input row, missing where no vector
        return _fill(rows.ok, values, dtype)

    columns = {"path": pd.array(rows.paths, dtype="string")}
    if any(label is not None for label in rows.labels):
        columns["label"] = pd.array(rows.labels, dtype="string")
    columns["predicted"] = spread(names[order[:, 0]] if k else [], "string")
    columns["probability"] = spread(np.take_along_axis(probs, order[:, :1], 1)[:, 0], "Float32")
    for j in range(k):
        columns[f"top{j + 1}_label"] = spread(names[order[:, j]], "string")
        columns[f"top{j + 1}_probability"] = spread(np.take_along_axis(probs, order[:, j:j + 1], 1)[:, 0], "Float32")
    if detector is not None:
        columns["unknown"] = spread(detector.is_unknown(scores), "boolean")
        columns["ood_score"] = spread(scores, "Float32")
    else:  # the flag is unavailable for this run: say so with nulls rather than a made-up False
        columns["unknown"] = pd.array([None] * n, dtype="boolean")
        columns["ood_score"] = pd.array([None] * n, dtype="Float32")
    if all_probabilities:
        for i, cls in enumerate(classes):
            columns[f"prob_{cls}"] = spread(probs[:, i], "Float32")
    columns["error"] = pd.array(rows.errors, dtype="string")
    return pd.DataFrame(columns)


def _fill(ok: np.ndarray, values, dtype):
    """Per-usable-row ``values`` spread over all rows, null (pandas' mask) where a row has no vector."""
    import pandas as pd

    values = np.asarray(values)
    if dtype == "string":
        data = np.full(len(ok), None, dtype=object)
        data[ok] = values
        return pd.array(data, dtype="string")
    data = np.zeros(len(ok), np.float32 if dtype == "Float32" else bool)
    data[ok] = values
    array_type = pd.arrays.FloatingArray if dtype == "Float32" else pd.arrays.BooleanArray
    return array_type(data, ~ok)


def write_predictions(frame, out: str | os.PathLike) -> str:
    """Write atomically: CSV when the name ends in ``.csv``, Parquet otherwise."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    import shardformat

    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    # pandas' string dtype arrives as large_string; plain string is what every other file here uses
    table = table.cast(pa.schema([pa.field(f.name, pa.string() if f.type == pa.large_string() else f.type)
                                  for f in table.schema]))
    out = os.fspath(out)
    if out.lower().endswith(".csv"):
        shardformat.atomic_write_via_path(out, lambda tmp: pacsv.write_csv(table, tmp))
    else:
        path = os.path.abspath(out)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fs, resolved = shardformat.resolve(path)
        shardformat.atomic_write_table(table, fs, resolved)
    return out
