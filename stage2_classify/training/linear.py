"""A fast linear head for cross-validation: multinomial logistic regression fitted by L-BFGS on raw vectors.

Why not the Keras head or scikit-learn's ``LogisticRegression``: CV fits K models, and on 50,000 × 1,280
vectors both take minutes on two cores (``bench/cv.py`` measures all three). Here every L-BFGS step is two
float32 matrix products over the training rows, standardisation is folded into the weights (no standardised
copy of the matrix), and the next fold starts from the previous fold's weights (the optimum is unique, so
this changes only how fast it is reached). The model is the same as the Keras head with ``hidden=()``.

The products are thin (k columns) and bound by memory, not arithmetic, so a second BLAS thread gains
little, while OpenBLAS threads that spin-wait lose whole scheduler slices whenever another process holds a
core: measured on the shared 2-core machine, one fold of 40,000 × 1,280 took 6.6 s with one BLAS thread and
13.7 s with two (8,000 rows: 2.0 s against 10 s). Fits therefore run with ``blas_threads=1`` by default.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class LinearHead:
    mean: np.ndarray  # (d,) training-row mean
    scale: np.ndarray  # (d,) training-row standard deviation (1 for constant features)
    weights: np.ndarray  # (d, k) on standardised features
    bias: np.ndarray  # (k,)
    iterations: int = 0

    def predict_proba(self, x: np.ndarray, chunk: int = 16384) -> np.ndarray:
        w = (self.weights / self.scale[:, None]).astype(np.float32)
        b = self.bias - (self.mean / self.scale) @ self.weights
        out = np.empty((len(x), w.shape[1]), np.float32)
        for s in range(0, len(x), chunk):
            out[s:s + chunk] = _softmax(x[s:s + chunk] @ w + b)
        return out


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def fit_linear(x: np.ndarray, y: np.ndarray, n_classes: int, *, l2: float = 1e-3, max_iter: int = 100,
               tol: float = 1e-6, sample_weight: np.ndarray | None = None,
               init: LinearHead | None = None, blas_threads: int | None = 1) -> LinearHead:
    """Minimise mean (weighted) cross-entropy + ``l2``/2 · ‖W‖² over standardised features with L-BFGS.

    ``blas_threads``: BLAS threads during the fit (None: the library's default; see the module doc).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=blas_threads, user_api="blas"):
        return _fit(x, y, n_classes, l2, max_iter, tol, sample_weight, init)


def _fit(x, y, n_classes, l2, max_iter, tol, sample_weight, init) -> LinearHead:
    from scipy.optimize import minimize

    from stage2_classify.training.fit import column_stats

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    mean, var = column_stats(x)
    scale = np.sqrt(np.where(var > 1e-12, var, 1.0))
    onehot = np.zeros((n, n_classes))
    onehot[np.arange(n), y] = 1.0
    weight = (np.ones(n) if sample_weight is None else np.asarray(sample_weight, np.float64))
    weight = weight / weight.sum()
    mean_over_scale = mean / scale

    def loss_grad(theta: np.ndarray):
        w = theta[:d * n_classes].reshape(d, n_classes)
        b = theta[d * n_classes:]
        w_raw = (w / scale[:, None]).astype(np.float32)  # standardisation folded into the weights
        logits = (x @ w_raw).astype(np.float64) + (b - mean_over_scale @ w)
        logits -= logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(logits).sum(axis=1))
        loss = float(weight @ (log_z - (logits * onehot).sum(axis=1))) + 0.5 * l2 * float((w * w).sum())
        g = (np.exp(logits - log_z[:, None]) - onehot) * weight[:, None]
        g_sum = g.sum(axis=0)
        grad_w = ((x.T @ g.astype(np.float32)).astype(np.float64) - np.outer(mean, g_sum)) / scale[:, None] + l2 * w
        return loss, np.concatenate([grad_w.ravel(), g_sum])

    theta0 = np.zeros(d * n_classes + n_classes)
    if init is not None and init.weights.shape == (d, n_classes):
        theta0 = np.concatenate([init.weights.ravel(), init.bias])
    res = minimize(loss_grad, theta0, jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "ftol": tol, "gtol": 1e-5})
    theta = res.x
    return LinearHead(mean=mean, scale=scale, weights=theta[:d * n_classes].reshape(d, n_classes),
                      bias=theta[d * n_classes:], iterations=int(res.nit))
