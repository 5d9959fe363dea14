"""Cross-validation: every image predicted exactly once, groups and duplicates never split across folds,
deterministic and order-independent, the documented files and contract (``cross_validate(...).oof``)."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import shardformat
from stage2_classify import cross_validate, load_dataset
from tests.support.synthetic import synthetic_metadata, write_synthetic_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("cv") / "shards", counts=(50, 40, 30), unlabelled=4,
                                  spread=1.0)


def test_every_labelled_image_is_predicted_exactly_once(shards, tmp_path):
    res = cross_validate(shards, tmp_path / "cv", folds=5, seed=0)
    oof = res.oof
    assert list(oof.columns) == ["path", "content_id", "label", "fold", "prob_class_0", "prob_class_1", "prob_class_2"]
    assert len(oof) == 120 and oof["path"].is_unique and set(oof["fold"]) == set(range(5))
    np.testing.assert_allclose(oof[[f"prob_{c}" for c in res.classes]].sum(axis=1), 1.0, rtol=1e-5)
    for f in range(5):  # stratified: each class in every fold, in proportion
        counts = oof[oof.fold == f]["label"].value_counts()
        assert abs(counts["class_0"] - 10) <= 1 and abs(counts["class_2"] - 6) <= 1
    on_disk = pq.read_table(tmp_path / "cv" / "oof_predictions.parquet").to_pandas()
    pd.testing.assert_frame_equal(on_disk, oof, check_dtype=False)
    saved = json.loads((tmp_path / "cv" / "cv_metrics.json").read_text())
    assert saved["folds"] == 5 and len(saved["per_fold"]) == 5 and saved["images"] == 120
    acc = saved["summary"]["accuracy"]
    assert acc["ci95"][0] <= acc["mean"] <= acc["ci95"][1] and acc["mean"] > 0.8
    assert res.summary["macro_f1"]["mean"] == pytest.approx(np.mean([m["macro_f1"] for m in res.fold_metrics]))
    assert saved["pooled"]["n"] == 120 and "ci95" in saved["pooled"]
    assert "cross-validation: 5 folds, 120 images" in res.format()


def test_folds_are_order_independent_and_seeded(shards, tmp_path):
    a = cross_validate(shards, folds=4, seed=1).oof.set_index("path").sort_index()
    fs = shardformat.read_features(shards)
    order = np.random.default_rng(5).permutation(len(fs))  # the same rows, shuffled into other shard files
    meta = synthetic_metadata(16)
    for i, rows in enumerate(np.array_split(order, 3)):
        shardformat.write_shard(tmp_path / "shuffled", f"part-x-{i:05d}.parquet", meta, paths=fs.paths[rows],
                                labels=fs.labels[rows], content_ids=fs.content_ids[rows], file_sizes=[1] * len(rows),
                                mtimes_ns=[0] * len(rows), features=fs.features[rows])
    b = cross_validate(tmp_path / "shuffled", folds=4, seed=1).oof.set_index("path").sort_index()
    pd.testing.assert_frame_equal(a, b)
    c = cross_validate(shards, folds=4, seed=2).oof.set_index("path").sort_index()
    assert not (a["fold"] == c["fold"]).all()


def test_groups_and_duplicates_never_span_two_folds(tmp_path):
    rng = np.random.default_rng(0)
    n = 90
    y = np.repeat([0, 1, 2], 30)
    x = (rng.normal(0, 1, (n, 8)) + y[:, None] * 2).astype(np.float32)
    groups = [f"patient{i // 3}" for i in range(60)] + [None] * 30  # 20 patients with 3 images each
    cids = [f"c{i}" for i in range(n)]
    cids[75] = cids[80] = "dup"  # an exact duplicate among the ungrouped images
    shardformat.write_shard(tmp_path / "s", "part-g-00000.parquet", synthetic_metadata(8),
                            paths=[f"x/{i}.png" for i in range(n)], labels=[f"k{v}" for v in y], content_ids=cids,
                            file_sizes=[1] * n, mtimes_ns=[0] * n, features=x, groups=groups)
    res = cross_validate(tmp_path / "s", folds=5, seed=0)
    ds = load_dataset(tmp_path / "s")
    fold = dict(zip(res.oof["path"], res.oof["fold"]))
    by_group: dict = {}
    for p, g in zip(ds.paths, ds.groups):
        if g is not None:
            by_group.setdefault(g, set()).add(fold[p])
    assert len(by_group) == 20 and all(len(f) == 1 for f in by_group.values())
    assert fold["x/75.png"] == fold["x/80.png"]
    assert len(res.oof) == n and res.oof["path"].is_unique


def test_keras_head_option_and_bad_arguments(shards):
    res = cross_validate(shards, folds=3, head="train", hidden=(8,), epochs=3, batch_size=32)
    assert len(res.oof) == 120 and res.head == "auto"  # "train": the older spelling of the default head
    with pytest.raises(ValueError, match="folds must be at least 2"):
        cross_validate(shards, folds=1)
    with pytest.raises(ValueError, match="head must be one of"):
        cross_validate(shards, head="forest")


def test_a_dataset_in_memory_is_accepted(shards):
    ds = load_dataset(shards)
    res = cross_validate(ds, folds=3)
    assert res.classes == ds.classes and res.fold_metrics[0]["n"] == (res.oof.fold == 0).sum()
