"""The shard format's own guarantees: round trip, parallel load into one matrix, refusal of bad vectors."""

import numpy as np
import pytest

import shardformat
from shardformat import ShardMetadata


def meta(dim=4):
    return ShardMetadata("b", "w", "0" * 64, {"input_size": 1}, dim)


def write(directory, name, feats, start=0):
    n = len(feats)
    return shardformat.write_shard(directory, name, meta(feats.shape[1]), paths=[f"p{start + i}" for i in range(n)],
                                   labels=["x"] * n, content_ids=["c"] * n, file_sizes=[1] * n,
                                   mtimes_ns=[0] * n, features=feats)


def test_many_shards_load_in_order_into_one_matrix(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(n, 4)).astype(np.float32) for n in (5, 0, 17, 3)]
    start = 0
    for i, p in enumerate(parts):
        if len(p):
            write(tmp_path, f"part-a-{i:05d}.parquet", p, start)
        start += len(p)
    fs = shardformat.read_features(tmp_path, threads=3)
    np.testing.assert_array_equal(fs.features, np.concatenate(parts))
    assert fs.paths.tolist() == [f"p{i}" for i in range(25)]
    assert fs.features.flags.c_contiguous and fs.features.dtype == np.float32


def test_non_finite_vectors_are_refused_naming_the_shard(tmp_path):
    feats = np.ones((3, 4), np.float32)
    feats[1, 2] = np.nan
    write(tmp_path, "part-a-00000.parquet", feats)
    with pytest.raises(shardformat.ShardFormatError, match="part-a-00000.parquet: 1 feature vector"):
        shardformat.read_features(tmp_path)


def test_empty_directory_reads_as_empty(tmp_path):
    fs = shardformat.read_features(tmp_path / "nothing")
    assert len(fs) == 0 and fs.metadata is None
