"""A handful of images the short way: pixels decoded in this process, the run's ONNX backbone, the head in numpy.

``stage2-classify predict --images`` on one file (or up to :data:`MAX_IMAGES`) took 7–17 s and 1.3 GB on two
cores through the general path: Keras and torch imported to load the head, a pool of decode worker
processes started, the feature cache written and read back. Here the same run answers with the same rows
(path as given, predicted, top-k, unknown, ood_score, error) from what is already on disk: stage 1's own
pixels (``stage1_extract.load_pixels``), its verified ONNX export of the run's backbone
(``stage1_extract.find_model``) run by ONNX Runtime on the CPU, and the head's layers read from
``model.keras`` (its ``config.json`` and weights file, nothing executed) and applied in numpy the way Keras
applies them. Nothing is cached, so a folder, a file list, DICOM files (one row per frame there), a
feature folder or a GPU provider take the general path (:func:`wanted` says which).
"""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from stage2_classify.errors import RunDirError

MAX_IMAGES = 8
LIST_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet")
EPSILON = 1e-7  # keras.config.epsilon(): Normalization divides by max(sqrt(variance), epsilon)


def wanted(images, *, features=None, provider: str = "auto") -> bool:
    """Whether ``images`` is a handful of existing non-DICOM image files that the short way can predict."""
    from stage1_extract import is_dicom_file

    if features is not None or provider not in ("auto", "cpu"):
        return False
    paths = [os.fspath(p) for p in images] if isinstance(images, (list, tuple)) else [os.fspath(images)]
    if not 0 < len(paths) <= MAX_IMAGES:
        return False
    for given in paths:
        path = Path(given).expanduser()
        if not path.is_file() or path.suffix.lower() in LIST_SUFFIXES or is_dicom_file(os.fspath(path)):
            return False
    return True


def head_steps(model_file: str | os.PathLike) -> list[tuple[str, dict]]:
    """The head in ``model.keras`` as arrays, without Keras: ("standardise", mean, std) then ("dense", kernel,
    bias, activation)… in layer order. :class:`RunDirError` when it is not the head ``train`` builds."""
    import h5py

    with zipfile.ZipFile(model_file) as z:
        config = json.loads(z.read("config.json"))
        weights = z.read("model.weights.h5")
    steps, seen = [], {}
    with h5py.File(io.BytesIO(weights), "r") as h5:
        for layer in config["config"]["layers"]:
            kind, cfg = layer["class_name"], layer["config"]
            key = {"Dense": "dense", "Normalization": "normalization"}.get(kind)
            if kind in ("InputLayer", "Dropout"):
                continue
            if key is None:
                raise RunDirError(f"{model_file}: layer {cfg.get('name')} ({kind}) is not part of a stage-2 head")
            n = seen.get(key, 0)
            seen[key] = n + 1
            if kind == "Normalization":
                mean, var = (np.asarray(cfg[k], np.float32).reshape(-1) for k in ("mean", "variance"))
                steps.append(("standardise", {"mean": mean, "std": np.maximum(np.sqrt(var), np.float32(EPSILON))}))
                continue
            group = h5[f"layers/{key}{'' if n == 0 else f'_{n}'}/vars"]
            kernel, bias = np.asarray(group["0"], np.float32), np.asarray(group["1"], np.float32)
            if cfg.get("activation") not in ("relu", "softmax", "linear") or kernel.shape[1] != cfg["units"]:
                raise RunDirError(f"{model_file}: layer {cfg.get('name')} is not a dense layer of a stage-2 head")
            steps.append(("dense", {"kernel": kernel, "bias": bias, "activation": cfg["activation"]}))
    if not steps or steps[-1][0] != "dense" or steps[-1][1]["activation"] != "softmax":
        raise RunDirError(f"{model_file}: the head does not end in a softmax layer")
    return steps


def apply_head(steps, features: np.ndarray) -> np.ndarray:
    """Class probabilities of raw vectors, computed as the Keras head computes them (float32)."""
    x = np.asarray(features, np.float32)
    for kind, p in steps:
        if kind == "standardise":
            x = (x - p["mean"]) / p["std"]
            continue
        x = x @ p["kernel"] + p["bias"]
        if p["activation"] == "relu":
            x = np.maximum(x, 0)
        elif p["activation"] == "softmax" and len(x):
            x = np.exp(x - x.max(axis=1, keepdims=True))
            x = x / x.sum(axis=1, keepdims=True)
    return x


def predict_few(images, run: str | os.PathLike, *, top_k: int = 3, all_probabilities: bool = False,
                weights=None, onnx=None, progress: bool = True):
    """The predictions table of :meth:`Classifier.predict` for a handful of image files (see :func:`wanted`), or
    None where this run needs the general path: a head other than the one ``train`` builds, or a backbone
    that only the general path can rebuild (the general path then says what is wrong, if anything)."""
    import onnxruntime as ort

    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    from shardformat import IncompatibleShardsError, ShardMetadata
    from stage1_extract import find_model, load_pixels
    from stage2_classify.inference.classifier import prediction_frame
    from stage2_classify.inference.inputs import Resolved
    from stage2_classify.inference.ood import for_run
    from stage2_classify.runs.load import check_labels, check_run

    path = check_run(run)
    classes = [str(c) for c in json.loads((path / "labels.json").read_text())]
    check_labels(path, classes)
    meta = ShardMetadata.from_json((path / "shard_metadata.json").read_text())
    if weights is None:
        from stage2_classify.runs.load import own_backbone

        weights = own_backbone(path)  # a fine-tuned run: its own backbone, wherever the run now is
    try:
        steps = head_steps(path / "model.keras")
        model = find_model(meta, weights=weights, onnx=onnx)
    except (RunDirError, IncompatibleShardsError, KeyError, OSError, ValueError):  # OSError: files not found
        return None
    if steps[-1][1]["kernel"].shape[1] != len(classes):
        return None  # the general path names the mismatch
    given = [os.fspath(p) for p in images] if isinstance(images, (list, tuple)) else [os.fspath(images)]
    unique = list(dict.fromkeys(os.path.abspath(Path(g).expanduser()) for g in given))
    pixels = load_pixels(unique, meta.preprocessing)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.onnx_path, sess_options=opts, providers=["CPUExecutionProvider"])
    vectors = session.run(None, {session.get_inputs()[0].name: pixels.array})[0] if len(pixels.paths) else \
        np.zeros((0, meta.feature_dim), np.float32)
    row = {p: i for i, p in enumerate(pixels.paths)}
    failed = dict(pixels.errors)
    keys = [os.path.abspath(Path(g).expanduser()) for g in given]
    ok = np.asarray([k in row for k in keys], bool)
    features = np.asarray(vectors, np.float32)[[row[k] for k in keys if k in row]]
    rows = Resolved(list(given), [None] * len(given), ok, features,
                    [None if k in row else failed.get(k, "could not be decoded") for k in keys])
    detector, note = for_run(path, classes, meta)
    if detector is None and progress:
        print(f"note: {note}", file=sys.stderr)
    scores = detector.score(rows.features) if detector is not None else None
    return prediction_frame(rows, apply_head(steps, rows.features), classes, top_k, scores, detector,
                            all_probabilities)
