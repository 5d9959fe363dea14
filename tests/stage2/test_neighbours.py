"""Cosine nearest neighbours: the blocked exact search against scikit-learn's brute force, and the ANN backend."""

import numpy as np
import pytest

from stage2_classify.doctor.neighbours import nearest_neighbours, normalise


def _brute(x: np.ndarray, k: int):
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute").fit(x)
    dist, idx = nn.kneighbors(x)
    return idx, 1.0 - dist


@pytest.mark.parametrize("n,block", [(257, 64), (300, 300), (130, 1000)])
def test_exact_matches_brute_force(n, block):
    x = np.random.default_rng(n).normal(size=(n, 24)).astype(np.float32)
    nb = nearest_neighbours(x, 7, backend="exact", block=block)
    idx, sims = _brute(x, 7)
    # drop each row itself from sklearn's answer (continuous random data: no ties, self is first)
    assert (idx[:, 0] == np.arange(n)).all()
    np.testing.assert_array_equal(nb.indices, idx[:, 1:])
    np.testing.assert_allclose(nb.similarities, sims[:, 1:], atol=1e-5)
    assert nb.backend == "exact" and nb.k == 7
    assert (np.diff(nb.similarities, axis=1) <= 1e-6).all()  # most similar first


def test_duplicates_zero_rows_and_fewer_rows_than_k():
    x = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]], np.float32)
    nb = nearest_neighbours(x, 5, block=2)
    assert nb.indices.shape == (4, 5)
    assert nb.indices[0, 0] == 1 and nb.similarities[0, 0] == pytest.approx(1.0)
    assert (nb.indices[:, 3:] == -1).all() and np.isneginf(nb.similarities[:, 3:]).all()  # only 3 other rows
    assert (nb.indices != np.arange(4)[:, None]).all()  # never itself
    assert np.allclose(normalise(x)[3], 0) and np.allclose(nb.similarities[3, :3], 0)
    single = nearest_neighbours(np.ones((1, 3), np.float32), 3)
    assert (single.indices == -1).all()


def test_bad_arguments():
    x = np.ones((3, 2), np.float32)
    with pytest.raises(ValueError, match="backend"):
        nearest_neighbours(x, 2, backend="faiss-gpu")
    with pytest.raises(ValueError, match="at least 1"):
        nearest_neighbours(x, 0)


def test_usearch_backend_finds_nearly_all_neighbours():
    pytest.importorskip("usearch", reason="the optional 'ann' extra (usearch) is not installed")
    x = np.random.default_rng(1).normal(size=(2000, 32)).astype(np.float32)
    approx = nearest_neighbours(x, 5, backend="usearch")
    exact = nearest_neighbours(x, 5, backend="exact")
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(approx.indices, exact.indices)])
    assert approx.backend == "usearch" and recall > 0.95
    assert (approx.indices != np.arange(2000)[:, None]).all()


def test_auto_is_exact_for_small_sets():
    x = np.random.default_rng(2).normal(size=(50, 8)).astype(np.float32)
    assert nearest_neighbours(x, 3).backend == "exact"
