"""Heatmaps of what a prediction looked at: CAM for linear heads, closed-form Grad-CAM for MLP heads.

The backbone's pooled vector is the global average of its last convolutional map ``A`` (D×h×w; stage 1's
``feature_map`` export variant outputs both). For a head ``z = head(f)`` on ``f = mean_xy A``, Grad-CAM's
channel weights are ``α = ∂z_t/∂f`` (the class score before the softmax). The head is affine pieces and
ReLUs, so this gradient is a product of its weight matrices and ReLU masks, computed forward-only:

* standardisation ``(f - μ) / σ`` (Keras' Normalization layer) contributes the diagonal ``1/σ``;
* each ``Dense(relu)`` contributes its kernel and the mask ``pre-activation > 0`` of this image;
* the last ``Dense`` contributes column ``t`` of its kernel.

The map is ``ReLU(Σ_k α_k A_k)`` divided by its maximum (all zeros when nothing speaks for the class). For a
linear head it is exactly Class Activation Mapping (``z_t = mean_xy Σ_k α_k A_k + const``). No autograd:
the same arithmetic runs inside the exported ONNX file (:mod:`stage2_classify.inference.export`).

Coordinates: the model sees a centre crop (shorter side resized to ``resize``, ``input_size`` square
cropped). ``crop_heatmap`` is over that crop (S×S, what the ONNX file's ``heatmap`` output holds);
``heatmap`` is over the whole original image (its longer side at most ``max_side`` pixels), zero outside
the crop the model saw, whose box (``crop``: left, top, right, bottom in original pixels) is given too.
Pixels come from :func:`stage1_extract.load_pixels`, so DICOM and 16-bit images get the window the model saw.
"""

from __future__ import annotations

import os

import numpy as np

from stage2_classify.errors import ExplainError
from stage2_classify.inference.head_arrays import channel_weights, head_is_linear, head_layers

MAX_SIDE = 512  # the heatmap over the original image: longer side at most this many pixels
EPS = 1e-12  # a map whose maximum is below this is all zeros
BATCH = 16


def class_maps(steps, features: np.ndarray, feature_map: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The heatmaps on the feature map's grid (N×h×w, in [0, 1])."""
    alpha = channel_weights(steps, features, target)
    n, d, h, w = feature_map.shape
    cam = (alpha[:, None, :] @ np.asarray(feature_map, np.float64).reshape(n, d, h * w)).reshape(n, h, w)
    cam = np.maximum(cam, 0.0)
    top = cam.reshape(len(cam), -1).max(axis=1, initial=0.0)
    return (cam / np.maximum(top, EPS)[:, None, None]).astype(np.float32)


def upsample_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Bilinear interpolation from ``n_in`` cells to ``n_out`` (half-pixel centres, edges held), as a matrix."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    return _interpolation(src, n_in, np.ones(n_out, bool))


def _interpolation(src: np.ndarray, n_in: int, inside: np.ndarray) -> np.ndarray:
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((len(src), n_in))
    rows = np.arange(len(src))
    np.add.at(m, (rows, lo), (1 - frac) * inside)
    np.add.at(m, (rows, hi), frac * inside)
    return m


def crop_heatmaps(maps: np.ndarray, size: int) -> np.ndarray:
    """Heatmaps over the S×S crop the model saw (N×S×S)."""
    ry, rx = upsample_matrix(size, maps.shape[1]), upsample_matrix(size, maps.shape[2])
    return (ry @ maps.astype(np.float64) @ rx.T).astype(np.float32)


def image_heatmap(grid: np.ndarray, width: int, height: int, crop, max_side: int = MAX_SIDE) -> np.ndarray:
    """One heatmap (h×w grid) spread over its whole original image (longer side ≤ ``max_side``), 0 outside
    ``crop``."""
    scale = min(1.0, max_side / max(width, height))
    out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
    left, top, right, bottom = crop

    def axis(n_out: int, extent: int, start: float, stop: float, cells: int) -> np.ndarray:
        centre = (np.arange(n_out) + 0.5) * extent / n_out  # original-pixel coordinate of each output pixel
        inside = (centre >= start) & (centre < stop)
        src = np.clip((centre - start) / (stop - start) * cells - 0.5, 0, cells - 1)
        return _interpolation(src, cells, inside)

    ry = axis(out_h, height, top, bottom, grid.shape[0])
    rx = axis(out_w, width, left, right, grid.shape[1])
    return np.clip(ry @ grid.astype(np.float64) @ rx.T, 0, 1).astype(np.float32)


def target_indices(target, classes: list[str], probabilities: np.ndarray) -> np.ndarray:
    """Per row: the predicted class (``"predicted"``) or the named class."""
    if target is None or target == "predicted":
        return probabilities.argmax(axis=1)
    if target not in classes:
        raise ExplainError(f"target {target!r} is not one of this run's classes: {', '.join(classes)} "
                           "(or 'predicted')")
    return np.full(len(probabilities), classes.index(target), np.int64)


def _run_backbone(onnx_path: str, pixels: np.ndarray, providers) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(onnx_path, sess_options=opts, providers=providers or ["CPUExecutionProvider"])
    parts = [session.run(["features", "feature_map"], {"images": pixels[i:i + BATCH]})
             for i in range(0, len(pixels), BATCH)]
    if not parts:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0, 1, 1), np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


class RunView:
    """What :func:`explain` needs of a run, loaded from its directory without :class:`Classifier` (the reports
    use it: the classifier module sits above them)."""

    def __init__(self, run) -> None:
        from stage2_classify.runs.load import load_run

        loaded = load_run(run)
        self.run_dir, self.metadata, self.model, self.classes = loaded.path, loaded.metadata, loaded.model, loaded.classes
        self.backbone_weights = loaded.weights  # a fine-tuned run's own backbone

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        from stage2_classify.training.fit import predict_proba

        return predict_proba(self.model, np.asarray(features, np.float32))


def explain(classifier, images, *, target: str = "predicted", weights: str | os.PathLike | None = None,
            onnx: str | os.PathLike | None = None, max_side: int = MAX_SIDE, providers=None,
            keep_images: bool = False):
    """Heatmaps for ``images`` (a file, a folder, a file list or a list of paths): a pandas DataFrame with one
    row per image: ``path``, ``predicted``, ``probability``, ``target`` (the class explained),
    ``target_probability``, ``method`` (CAM or Grad-CAM), ``heatmap`` (over the original image, in [0, 1],
    0 outside the crop), ``crop`` (left, top, right, bottom in original pixels), ``image_size`` (width,
    height), ``crop_heatmap`` (S×S over the crop) and ``error`` (why an image has none; such rows come
    last). ``keep_images`` adds ``image``: the decoded original (H×W×3 uint8, windowed as the model saw it),
    for overlays.
    """
    import pandas as pd
    from stage1_extract import Preprocessing, Stage1Error, find_model, load_image, load_pixels

    if isinstance(classifier, (str, os.PathLike)):  # a run directory (the reports pass one)
        classifier = RunView(classifier)
    meta = classifier.metadata
    weights = weights if weights is not None else getattr(classifier, "backbone_weights", None)
    steps = head_layers(classifier.model)
    target_indices(target, classifier.classes, np.zeros((0, len(classifier.classes))))  # a bad name fails first
    try:
        backbone = find_model(meta, weights=weights, onnx=onnx, precision="fp32", feature_map=True)
    except (Stage1Error, ValueError) as exc:
        raise ExplainError(f"no heatmaps for the run {classifier.run_dir}: {exc}") from None
    prep = Preprocessing.from_dict(meta.preprocessing)
    pixels = load_pixels(images, meta.preprocessing)
    features, fmap = _run_backbone(backbone.onnx_path, pixels.array, providers)
    probs = classifier.predict_proba(features) if len(features) else np.zeros((0, len(classifier.classes)))
    chosen = target_indices(target, classifier.classes, probs)
    grids = class_maps(steps, features, fmap, chosen) if len(features) else np.zeros((0, 1, 1), np.float32)
    crops = crop_heatmaps(grids, prep.input_size) if len(features) else []
    method = "CAM" if head_is_linear(steps) else "Grad-CAM"
    rows = []
    for i, path in enumerate(pixels.paths):
        row = {"path": path, "predicted": classifier.classes[int(probs[i].argmax())],
               "probability": float(probs[i].max()), "target": classifier.classes[int(chosen[i])],
               "target_probability": float(probs[i, chosen[i]]), "method": method}
        try:
            image = load_image(path)
        except (OSError, ValueError, Stage1Error) as exc:  # decoded once for the model, not now: say so, keep the rest
            image, row["error"] = None, f"could not be decoded again for its heatmap: {exc}"
        if image is not None:
            h, w = image.shape[:2]
            box = prep.crop_box(w, h)
            row.update(heatmap=image_heatmap(grids[i], w, h, box, max_side), crop=tuple(float(v) for v in box),
                       image_size=(w, h), error=None)
            if keep_images:
                row["image"] = image
        row["crop_heatmap"] = crops[i]
        rows.append(row)
    rows += [{"path": path, "error": reason} for path, reason in pixels.errors]
    columns = ["path", "predicted", "probability", "target", "target_probability", "method", "heatmap", "crop",
               "image_size", "crop_heatmap", "error"] + (["image"] if keep_images else [])
    frame = pd.DataFrame(rows, columns=columns)
    return frame.astype({"probability": "Float32", "target_probability": "Float32"})
