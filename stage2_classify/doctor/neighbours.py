"""Cosine nearest neighbours of every feature vector: exact by blocked matrix products, or an ANN index.

Exact search computes the similarity matrix tile by tile (never whole) over the upper triangle only, and
keeps a running top-k per row: each tile's ``topk`` along its rows feeds the rows of the left block and
along its columns the rows of the right block, so every pair is scored once. Torch does the products and
the ``topk`` (its CPU ``topk`` is ~17x faster than ``numpy.argpartition`` on 8192 x 8192 tiles), which is
what keeps 50,000 x 1,280 vectors within seconds on 2 cores (``bench/doctor.py``).

scikit-learn's brute-force ``NearestNeighbors`` gives the same answer but partitions whole distance rows
with numpy and scores every pair twice: about 3x slower at 50,000 rows. Beyond ``EXACT_LIMIT`` rows the
quadratic cost wins anyway; ``backend="auto"`` then uses usearch (HNSW, ``pip install hybrid-transfer[ann]``)
when it is installed.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from stage2_classify.options import NEIGHBOUR_BACKENDS

log = logging.getLogger(__name__)

EXACT_LIMIT = 300_000  # rows; above this "auto" prefers an ANN index (exact: ~n^2 d / 150 GFLOP/s on 2 cores)
BACKENDS = NEIGHBOUR_BACKENDS


@dataclasses.dataclass
class Neighbours:
    """The ``k`` most similar other rows of each row, most similar first (``-1`` / ``-inf`` pad short rows)."""

    indices: np.ndarray  # (n, k) int64
    similarities: np.ndarray  # (n, k) float32 cosine similarity
    backend: str  # "exact" or "usearch"

    @property
    def k(self) -> int:
        return self.indices.shape[1]


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); an all-zero row stays zero (similar to nothing)."""
    x = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def nearest_neighbours(vectors: np.ndarray, k: int = 10, *, backend: str = "auto", block: int = 2048,
                       normalised: bool = False) -> Neighbours:
    """Cosine top-``k`` neighbours of every row among the other rows.

    ``backend``: ``"exact"`` (blocked products), ``"usearch"`` (approximate HNSW index; needs the ``ann``
    extra) or ``"auto"`` (exact up to ``EXACT_LIMIT`` rows, usearch beyond when installed, else exact).
    Pass ``normalised=True`` when rows already have unit length.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    x = np.ascontiguousarray(vectors if normalised else normalise(vectors), dtype=np.float32)
    n = len(x)
    if backend == "auto":
        backend = "exact"
        if n > EXACT_LIMIT:
            if _usearch_available():
                backend = "usearch"
            else:
                log.warning("%d rows: exact neighbour search is quadratic; install the 'ann' extra "
                            "(pip install usearch) for an approximate index", n)
    if backend == "usearch":
        if not _usearch_available():
            raise ImportError("backend='usearch' needs the usearch package: pip install 'hybrid-transfer[ann]'")
        idx, sims = _usearch(x, k)
    else:
        idx, sims = _exact(x, k, block)
    return Neighbours(idx, sims, backend)


def _usearch_available() -> bool:
    try:
        import usearch.index  # noqa: F401
    except ImportError:
        return False
    return True


def _pad(idx: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Widen to ``k`` columns when there are fewer than ``k`` other rows."""
    n, have = idx.shape
    if have >= k:
        return idx, sims
    return (np.concatenate([idx, np.full((n, k - have), -1, np.int64)], axis=1),
            np.concatenate([sims, np.full((n, k - have), -np.inf, np.float32)], axis=1))


def _exact(x: np.ndarray, k: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    n = len(x)
    kk = min(k, max(n - 1, 0))
    if kk == 0:
        return _pad(np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32), k)
    xt = torch.from_numpy(x)
    best_s = torch.full((n, kk), -torch.inf)
    best_i = torch.full((n, kk), -1, dtype=torch.int64)

    def merge(rows: slice, sims: torch.Tensor, idx: torch.Tensor) -> None:
        s = torch.cat([best_s[rows], sims], dim=1)
        i = torch.cat([best_i[rows], idx], dim=1)
        top_s, pos = s.topk(kk, dim=1)
        best_s[rows] = top_s
        best_i[rows] = i.gather(1, pos)

    with torch.no_grad():
        for i0 in range(0, n, block):
            rows_a = slice(i0, min(n, i0 + block))
            a = xt[rows_a]
            for j0 in range(i0, n, block):
                rows_b = slice(j0, min(n, j0 + block))
                tile = a @ xt[rows_b].T
                if j0 == i0:  # the diagonal tile holds both directions of its pairs, and each row itself
                    tile.fill_diagonal_(-torch.inf)
                s, j = tile.topk(min(kk, tile.shape[1]), dim=1)
                merge(rows_a, s, j + j0)
                if j0 != i0:
                    s, j = tile.topk(min(kk, tile.shape[0]), dim=0)
                    merge(rows_b, s.T, j.T + i0)
    return _pad(best_i.numpy(), best_s.numpy(), k)


def _usearch(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    from usearch.index import Index

    n, d = x.shape
    kk = min(k, max(n - 1, 0))
    if kk == 0:
        return _pad(np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32), k)
    index = Index(ndim=d, metric="ip", dtype="f32")  # inner product of unit rows = cosine similarity
    index.add(np.arange(n, dtype=np.uint64), x, threads=0)
    found = index.search(x, kk + 1, threads=0)
    keys = np.asarray(found.keys, dtype=np.int64)
    sims = (1.0 - np.asarray(found.distances, dtype=np.float32))
    valid = np.arange(kk + 1)[None, :] < np.asarray(found.counts)[:, None]
    keys = np.where(valid, keys, -1)
    sims = np.where(valid, sims, -np.inf).astype(np.float32)
    # Drop each row itself; a row whose own key is missing (an approximate index) drops its last match.
    drop = keys == np.arange(n)[:, None]
    no_self = ~drop.any(axis=1)
    drop[no_self, -1] = True
    first_self = drop.cumsum(axis=1) == 1
    drop &= first_self  # exactly one column per row
    keep = ~drop
    return _pad(keys[keep].reshape(n, kk), sims[keep].reshape(n, kk), k)
