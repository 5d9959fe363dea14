"""Shard directories given as URIs (here ``file://``, the one pyarrow filesystem available offline): writing and
reading through ``shardformat``, stage 1 writing to a URI with the local engine, and stage 2 loading from it."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import shardformat
from shardformat.layout import errors_path, meta_file
from stage1_extract import extract
from tests.support.helpers import make_image_tree, make_tiny_onnx

META = shardformat.ShardMetadata(
    backbone="test", weights_id="none", onnx_sha256="0" * 64,
    preprocessing={"input_size": 32, "resize": 36, "crop": "center", "interpolation": "bilinear",
                   "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
    feature_dim=4, precision="fp32", versions={},
)


def _write(directory, name, paths, seed):
    feats = np.random.default_rng(seed).normal(size=(len(paths), 4)).astype(np.float32)
    shardformat.write_shard(directory, name, META, paths=paths, labels=["a"] * len(paths),
                            content_ids=[f"1-{p}" for p in paths], file_sizes=[1] * len(paths),
                            mtimes_ns=[0] * len(paths), features=feats)
    return feats


def test_write_and_read_shards_through_a_file_uri(tmp_path):
    folder = tmp_path / "shards"
    uri = folder.as_uri()
    assert uri.startswith("file:///")
    f1 = _write(uri, "part-1.parquet", ["x/1.jpg", "x/2.jpg"], 0)
    f2 = _write(uri, "part-2.parquet", ["y/3.jpg"], 1)

    assert sorted(p.name for p in folder.iterdir()) == ["part-1.parquet", "part-2.parquet"]  # no temporaries left
    assert shardformat.list_shards(uri) == [str(folder / "part-1.parquet"), str(folder / "part-2.parquet")]
    fs = shardformat.read_features(uri)
    assert list(fs.paths) == ["x/1.jpg", "x/2.jpg", "y/3.jpg"]
    np.testing.assert_array_equal(fs.features, np.concatenate([f1, f2]))
    assert fs.metadata.compatibility_key() == META.compatibility_key()
    assert shardformat.read_metadata((folder / "part-2.parquet").as_uri()).backbone == "test"
    index, meta = shardformat.read_index(uri)
    assert index.column("path").to_pylist() == ["x/1.jpg", "x/2.jpg", "y/3.jpg"] and meta.feature_dim == 4

    # the same directory read as a plain path gives the same thing; plain pyarrow reads it too
    local = shardformat.read_features(folder)
    np.testing.assert_array_equal(local.features, fs.features)
    assert pq.read_table(folder).num_rows == 3


def test_a_missing_uri_directory_reads_as_empty(tmp_path):
    uri = (tmp_path / "nothing-here").as_uri()
    assert shardformat.list_shards(uri) == []
    assert len(shardformat.read_features(uri)) == 0


@pytest.fixture()
def tree(tmp_path):
    root = make_image_tree(tmp_path / "images", per_class=3)
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root


def test_stage1_local_engine_extracts_into_a_file_uri(tree, tmp_path):
    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    folder = tmp_path / "features"
    uri = folder.as_uri()
    s = extract(tree, uri, onnx=tiny, input_size=32, progress=False, shard_size=4)
    assert (s.extracted, s.errors, s.out) == (9, 1, uri)
    assert Path(errors_path(folder)).is_file() and Path(meta_file(folder, "run.json")).is_file()
    fs = shardformat.read_features(uri)
    assert len(fs) == 9 and fs.features.shape[1] == 8

    ref = extract(tree, tmp_path / "plain", onnx=tiny, input_size=32, progress=False)
    plain = shardformat.read_features(tmp_path / "plain")
    by_path = dict(zip(plain.paths, plain.features))
    for path, feat in zip(fs.paths, fs.features):
        np.testing.assert_allclose(feat, by_path[path], rtol=1e-6)
    assert ref.extracted == 9

    # incremental through the URI: nothing to do, then a change, a removal and a compaction
    assert extract(tree, uri, onnx=tiny, input_size=32, progress=False).extracted == 0
    (tree / "cat" / "cat_000.jpg").unlink()
    (tree / "space" / "space_000.jpg").write_bytes((tree / "coffee" / "coffee_000.jpg").read_bytes())
    s = extract(tree, uri, onnx=tiny, input_size=32, progress=False)
    assert (s.extracted, s.removed_rows) == (1, 2)
    fs = shardformat.read_features(uri)
    assert len(fs) == 8 == len(set(fs.paths)) and "cat/cat_000.jpg" not in set(fs.paths)


def test_stage2_loads_shards_from_a_uri(tree, tmp_path):
    data = pytest.importorskip("stage2_classify.data")
    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    uri = (tmp_path / "features").as_uri()
    extract(tree, uri, onnx=tiny, input_size=32, progress=False)
    ds = data.load_dataset(uri)
    assert ds.features.shape == (9, 8) and ds.classes == ["cat", "coffee", "space"]


@pytest.fixture()
def bucket(tmp_path, monkeypatch):
    """An object-store-like filesystem offline: ``mem://prefix`` maps to a SubTreeFileSystem over a local folder,
    whose listings, like S3's, give paths relative to the bucket (``prefix/part-….parquet``), not local paths."""
    import pyarrow.fs as pafs

    import shardformat.errors
    import shardformat.io

    root = tmp_path / "bucket"
    root.mkdir()
    real = shardformat.io.resolve

    def resolve(location):
        text = str(location)
        if text.startswith("mem://"):
            return pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem()), text[len("mem://"):].rstrip("/")
        return real(location)

    for module in (shardformat.io, shardformat, shardformat.errors):  # the errors table: shardformat.errors
        monkeypatch.setattr(module, "resolve", resolve)
    return root


def test_stage1_compacts_on_a_filesystem_with_bucket_relative_paths(tree, tmp_path, bucket):
    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    s = extract(tree, "mem://features", onnx=tiny, input_size=32, progress=False)
    assert s.extracted == 9 and Path(errors_path(bucket / "features")).is_file()
    assert all(not p.startswith("/") for p in shardformat.list_shards("mem://features"))  # S3-like listing
    (tree / "cat" / "cat_000.jpg").unlink()
    (tree / "space" / "space_000.jpg").write_bytes((tree / "coffee" / "coffee_000.jpg").read_bytes())
    s = extract(tree, "mem://features", onnx=tiny, input_size=32, progress=False)
    assert (s.extracted, s.removed_rows) == (1, 2)
    fs = shardformat.read_features(bucket / "features")
    assert len(fs) == 8 == len(set(fs.paths)) and "cat/cat_000.jpg" not in set(fs.paths)
