"""Stage 2 data: loading through shardformat, unlabelled rows, stratified/seeded splits, split files, metrics."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import shardformat
from stage2_classify.data.dataset import DatasetError, load_dataset
from stage2_classify.evaluation.metrics import classification_metrics
from stage2_classify.data.split import split_notes
from stage2_classify.data.splitfile import split_from_file
from tests.support.synthetic import write_synthetic_shards
from stage2_classify.training.fit import class_weights, column_stats


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("data") / "shards", counts=(40, 30, 20), unlabelled=7,
                                  shards=3)


def test_load_keeps_labelled_rows_and_counts_the_others(shards):
    ds = load_dataset(shards)
    assert ds.unlabelled == 7 and len(ds.y) == 90
    assert ds.features.dtype == np.float32 and ds.features.shape == (90, 16) and ds.features.flags.c_contiguous
    assert ds.classes == ["class_0", "class_1", "class_2"]
    assert ds.counts() == {"class_0": 40, "class_1": 30, "class_2": 20}
    assert all(p.startswith(label + "/") for p, label in zip(ds.paths, ds.labels))  # rows stay aligned
    assert ds.metadata.backbone == "synthetic"


def test_float16_shards_load_as_float32(tmp_path):
    ds = load_dataset(write_synthetic_shards(tmp_path / "f16", feature_dtype="float16"))
    assert ds.features.dtype == np.float32 and ds.metadata.feature_dtype == "float16"


def test_user_split_file_csv_and_parquet(shards, tmp_path):
    ds = load_dataset(shards)
    names = ["train", "val", "test"]
    rows = [(p, names[i % 3]) for i, p in enumerate(ds.paths[:-5])]  # the last 5 rows are not in the file
    csv = tmp_path / "split.csv"
    csv.write_text("path,split\n" + "".join(f"{p},{s.upper() if i % 2 else s}\n" for i, (p, s) in enumerate(rows)))
    split = split_from_file(ds.paths, csv)
    assert [len(split[k]) for k in ("train", "validation", "test")] == [29, 28, 28]
    assert len(split["unassigned"]) == 5
    assert all(ds.paths[i] == p for i, (p, s) in zip(split["train"], rows[0::3]))
    table = pa.table({"path": [p for p, _ in rows], "split": [s for _, s in rows]})
    pq.write_table(table, tmp_path / "split.parquet")
    from_parquet = split_from_file(ds.paths, tmp_path / "split.parquet")
    for k in split:
        np.testing.assert_array_equal(split[k], from_parquet[k])
    assert any("not in the split file" in n for n in split_notes(ds.y, ds.classes, split))
    old_json = tmp_path / "split.json"  # runs made before split.csv wrote split.json
    old_json.write_text(json.dumps({name: [p for p, s in rows if s == short] for name, short in
                                    (("train", "train"), ("validation", "val"), ("test", "test"))}))
    from_json = split_from_file(ds.paths, old_json)
    for k in split:
        np.testing.assert_array_equal(split[k], from_json[k])


def test_split_file_errors_are_clear(shards, tmp_path):
    ds = load_dataset(shards)
    bad = tmp_path / "bad.csv"
    bad.write_text(f"path,split\n{ds.paths[0]},holdout\n")
    with pytest.raises(DatasetError, match="unknown split names.*holdout"):
        split_from_file(ds.paths, bad)
    bad.write_text("file,fold\na,train\n")
    with pytest.raises(DatasetError, match="needs columns 'split' and 'path'"):
        split_from_file(ds.paths, bad)
    bad.write_text("path,split\nnot/there.png,train\n")
    with pytest.raises(DatasetError, match="none of the 90 shard rows"):
        split_from_file(ds.paths, bad)
    bad.write_text(f"path,split\n{ds.paths[0]},train\n{ds.paths[0]},test\n")
    with pytest.raises(DatasetError, match="more than one split"):
        split_from_file(ds.paths, bad)


def test_mixed_shards_are_refused_naming_both_files(tmp_path):
    mixed = write_synthetic_shards(tmp_path / "mixed", backbone="backbone_a", shards=1, prefix="part-a")
    write_synthetic_shards(mixed, backbone="backbone_b", shards=1, prefix="part-b")
    with pytest.raises(shardformat.IncompatibleShardsError) as err:
        load_dataset(mixed)
    message = str(err.value)
    assert "backbone_a" in message and "backbone_b" in message
    assert "part-a-00000.parquet" in message and "part-b-00000.parquet" in message


def test_errors_are_clear(tmp_path):
    with pytest.raises(DatasetError, match="no feature shards"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="only one class"):
        load_dataset(write_synthetic_shards(tmp_path / "one", counts=(20,)))
    with pytest.raises(DatasetError, match="none of the 12 rows has a label"):
        load_dataset(write_synthetic_shards(tmp_path / "none", counts=(), unlabelled=12))


def test_metrics_by_hand():
    proba = np.eye(4)[[0, 1, 1, 1, 1]] * 0.7 + 0.075  # class d has no rows at all
    rep = classification_metrics(np.array([0, 0, 1, 1, 2]), proba, ["a", "b", "c", "d"], bootstrap=False)
    assert rep["n"] == 5 and rep["accuracy"] == 0.6 and rep["balanced_accuracy"] == pytest.approx(0.5)
    a, b, c, d = (rep["per_class"][k] for k in "abcd")
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == (1.0, 0.5, pytest.approx(2 / 3), 2)
    assert a["specificity"] == 1.0 and b["specificity"] == pytest.approx(1 / 3)
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == (0.5, 1.0, pytest.approx(2 / 3), 2)
    assert c["precision"] is None and (c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 1)  # never predicted
    assert d["support"] is None and d["recall"] is None and d["f1"] is None  # no rows: null, not 0
    assert rep["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)  # over the classes present
    assert rep["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]


def test_class_weights_auto_balanced_none():
    y = np.array([0] * 90 + [1] * 10)
    w = class_weights(y, 2, "auto")
    assert w == {0: pytest.approx(100 / 180), 1: pytest.approx(5.0)}
    assert class_weights(np.array([0] * 50 + [1] * 40), 2, "auto") is None  # 1.25x: balanced enough
    assert class_weights(np.array([0] * 50 + [1] * 40), 2, "balanced") is not None
    assert class_weights(y, 2, "none") is None


def test_column_stats_match_numpy():
    x = np.random.default_rng(0).normal(5, 2, size=(1000, 7)).astype(np.float32)
    mean, var = column_stats(x, chunk=128)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(var, x.astype(np.float64).var(0), rtol=1e-5)
