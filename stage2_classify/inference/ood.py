"""The open-set flag: is a feature vector unlike anything the classifier was trained on?

A softmax head always names one of its classes, often with high confidence, even for a zebra shown to a
digit classifier. The score here is the Mahalanobis distance of the vector to the nearest class mean, with
one covariance shared by all classes (Lee et al., 2018, "A simple unified framework for detecting
out-of-distribution samples"): class means and the within-class covariance come from the training split;
the covariance is estimated with Ledoit-Wolf shrinkage (``sklearn.covariance.ledoit_wolf``), because a
1280-d covariance from a few thousand vectors is singular without it. The threshold is the distance that
keeps ``quantile`` (95%) of the validation split's vectors: about 5% of in-distribution images are
flagged by design, and anything farther from every class than that is ``unknown``.

Stored in the run directory as ``ood.npz``: a whitening matrix ``W`` (``W Wᵀ`` is the precision), the
whitened class means, the threshold and an ``info`` JSON string (method, quantile, rows used). The
distance is then a plain Euclidean one after ``x @ W``, which also makes it a few ONNX nodes in an export.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

FILE = "ood.npz"
QUANTILE = 0.95
MAX_COVARIANCE_ROWS = 10_000  # Ledoit-Wolf on more rows costs memory (rows × D float64) for no visible gain


@dataclasses.dataclass
class OpenSetDetector:
    """Mahalanobis distance to the nearest class mean, and the threshold above which a vector is unknown."""

    whitening: np.ndarray  # (D, D) float32: W with W Wᵀ = inverse of the shared within-class covariance
    centres: np.ndarray  # (C, D) float32: class means times W
    threshold: float
    info: dict

    def score(self, features: np.ndarray, batch: int = 4096) -> np.ndarray:
        """Distance of each vector to the nearest class mean (float32; larger is less like the training data)."""
        features = np.asarray(features, np.float32)
        out = np.empty(len(features), np.float32)
        c_sq = (self.centres.astype(np.float64) ** 2).sum(axis=1)
        for s in range(0, len(features), batch):
            z = features[s:s + batch].astype(np.float64) @ self.whitening
            d2 = (z * z).sum(axis=1, keepdims=True) - 2.0 * z @ self.centres.T + c_sq
            out[s:s + batch] = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
        return out

    def is_unknown(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (shardformat's writer: temporary name, fsync, rename; a full disk names the file)."""
        from shardformat.files import atomic_write

        atomic_write(path, lambda fh: np.savez(fh, whitening=self.whitening, centres=self.centres,
                                               threshold=np.float64(self.threshold),
                                               info=np.asarray(json.dumps(self.info))))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "OpenSetDetector":
        with np.load(path, allow_pickle=False) as z:  # arrays and one string: nothing is unpickled
            return cls(z["whitening"].astype(np.float32), z["centres"].astype(np.float32), float(z["threshold"]),
                       json.loads(str(z["info"])))


def fit(features: np.ndarray, y: np.ndarray, n_classes: int, calibration: np.ndarray | None = None, *,
        quantile: float = QUANTILE, seed: int = 0) -> OpenSetDetector:
    """Fit class means and the shrunk shared covariance on ``features``/``y`` (the training split) and set the
    threshold at the ``quantile`` of the distances of ``calibration`` (the validation split's vectors).

    Without calibration vectors the training vectors themselves are used; their distances are smaller
    than unseen ones', so more than ``1 - quantile`` of new in-distribution images will then be flagged.
    """
    from scipy.linalg import cholesky, solve_triangular
    from sklearn.covariance import ledoit_wolf

    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    x = np.asarray(features, np.float32)
    y = np.asarray(y, np.int64)
    counts = np.bincount(y, minlength=n_classes)
    present = counts > 0
    one_hot = np.zeros((len(y), n_classes), np.float64)
    one_hot[np.arange(len(y)), y] = 1.0
    means = one_hot.T @ x.astype(np.float64)  # per-class sums in one matmul
    means[present] /= counts[present, None]
    rows = np.random.default_rng(seed).permutation(len(x))[:MAX_COVARIANCE_ROWS]
    residuals = x[rows].astype(np.float64) - means[y[rows]]
    # The function, not the LedoitWolf estimator: the estimator also computes a pseudo-inverse by eigen-
    # decomposition (33 s for 1280-d on the 2-core test machine), which the Cholesky below makes unnecessary.
    covariance, shrinkage = ledoit_wolf(residuals, assume_centered=True)
    # Whitening from the Cholesky factor Σ = L Lᵀ: W = L⁻ᵀ, so W Wᵀ = Σ⁻¹ and (x - μ)ᵀ Σ⁻¹ (x - μ) = ‖(x - μ) W‖².
    lower = cholesky(covariance, lower=True)
    whitening = solve_triangular(lower, np.eye(len(lower)), lower=True).T
    detector = OpenSetDetector(whitening.astype(np.float32), (means[present] @ whitening).astype(np.float32),
                               0.0, {})
    calibrated_on = "validation"
    if calibration is None or len(calibration) == 0:
        calibration, calibrated_on = x, "train"
    scores = detector.score(calibration)
    detector.threshold = float(np.quantile(scores, quantile))
    detector.info = {
        "method": "mahalanobis-nearest-class-mean (tied covariance, Ledoit-Wolf shrinkage)",
        "quantile": quantile, "calibrated_on": calibrated_on, "calibration_rows": int(len(calibration)),
        "train_rows": int(len(x)), "covariance_rows": int(len(rows)), "shrinkage": float(shrinkage),
        "classes_with_rows": int(present.sum()), "feature_dim": int(x.shape[1]),
        "calibration_score_median": float(np.median(scores)),
    }
    return detector


def fit_for_run(run_dir: str | os.PathLike, dataset, split: dict[str, np.ndarray]) -> OpenSetDetector:
    """Fit on a training run's own data and write ``run_dir/ood.npz``; called by ``runs.files.write_run`` on the
    run's temporary folder before commit, so the detector is part of the atomic run."""
    val = split.get("validation", np.zeros(0, np.int64))
    detector = fit(dataset.features[split["train"]], dataset.y[split["train"]], len(dataset.classes),
                   dataset.features[val] if len(val) else None)
    detector.save(Path(run_dir) / FILE)
    return detector


def fit_from_training_shards(run_dir: Path, classes: list[str], metadata) -> OpenSetDetector:
    """For a run trained before ``ood.npz`` existed: reload its training shards (``config.json``'s ``shards``),
    take the rows its ``split.csv`` (or older ``split.json``) put in train and validation (matched by content,
    then path), fit, and store ``ood.npz`` in the run.

    Raises ``FileNotFoundError`` saying what is missing when the shards or the split cannot be found.
    """
    import shardformat
    from stage2_classify.data.dataset import load_dataset
    from stage2_classify.data.splitfile import split_from_file

    config = json.loads((run_dir / "config.json").read_text())
    shards = config.get("shards")
    split_file = next((run_dir / n for n in ("split.csv", "split.json") if (run_dir / n).is_file()), None)
    if not shards or split_file is None:
        raise FileNotFoundError(f"{run_dir} records no training shards or no split.csv")
    if "://" not in shards and not shardformat.list_shards(shards):
        raise FileNotFoundError(f"the training shards {shards} (from {run_dir / 'config.json'}) are not reachable "
                                "from here")
    ds = load_dataset(shards, expect=metadata)
    split = split_from_file(ds.paths, split_file, ds.content_ids)
    index = {c: i for i, c in enumerate(classes)}
    y = np.asarray([index.get(c, -1) for c in ds.classes], np.int64)[ds.y]  # the run's class order
    train, val = split["train"][y[split["train"]] >= 0], split.get("validation", np.zeros(0, np.int64))
    detector = fit(ds.features[train], y[train], len(classes), ds.features[val] if len(val) else None)
    detector.info["fitted_after_training_from"] = shards
    try:
        detector.save(run_dir / FILE)
    except OSError as exc:  # a read-only run: use it now, fit again next time
        detector.info["not_saved"] = str(exc)
    return detector


def for_run(run_dir: str | os.PathLike, classes: list[str], metadata) -> tuple[OpenSetDetector | None, str]:
    """The run's detector (loaded, or fitted now from its training shards for older runs) and a note: empty,
    or why the flag is unavailable."""
    run_dir = Path(run_dir)
    if (run_dir / FILE).is_file():
        return OpenSetDetector.load(run_dir / FILE), ""
    try:
        return fit_from_training_shards(run_dir, classes, metadata), ""
    except (FileNotFoundError, OSError, ValueError) as exc:
        return None, (f"the 'unknown' flag is unavailable for {run_dir}: it has no {FILE} and it could not be "
                      f"fitted from its training shards ({exc}); retrain the run, or call "
                      "Classifier.calibrate_ood(shards) with its training shards")
