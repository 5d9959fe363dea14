"""Stage 2: split, reproducibility, mixed shards refused, linear/MLP heads, save/reload, predict, sweep, imbalance."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import shardformat
from shardformat import ShardMetadata
from stage2_classify import evaluate, load_run, predict, sweep, train
from stage2_classify.data import DatasetError, load_dataset, split_from_file, stratified_split
from stage2_classify.metrics import classification_report
from stage2_classify.rundir import RunDirError
from stage2_classify.train import class_weights

REPO = Path(__file__).resolve().parents[1]
FAST = dict(epochs=20, patience=3, batch_size=32, learning_rate=1e-2, verbose=0)


def meta(backbone="fake_backbone", dim=16):
    return ShardMetadata(backbone=backbone, weights_id="sha256:test", onnx_sha256="0" * 64,
                         preprocessing={"input_size": 8}, feature_dim=dim)


def write_clusters(directory, *, counts=(40, 40, 40), dim=16, seed=0, backbone="fake_backbone", unlabelled=0,
                   shards=2):
    """Separable Gaussian clusters written as real shards (stage-2 mechanics do not need real images)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(len(counts), dim))
    feats, labels = [], []
    for k, n in enumerate(counts):
        feats.append(centres[k] + rng.normal(0, 1, size=(n, dim)))
        labels += [f"class_{k}"] * n
    feats.append(rng.normal(0, 1, size=(unlabelled, dim)))
    labels += [None] * unlabelled
    x = np.concatenate(feats).astype(np.float32)
    paths = [f"img_{i:05d}.png" for i in range(len(x))]
    for s, idx in enumerate(np.array_split(rng.permutation(len(x)), shards)):
        shardformat.write_shard(directory, f"part-test-{s:05d}.parquet", meta(backbone, dim),
                                paths=[paths[i] for i in idx], labels=[labels[i] for i in idx],
                                content_ids=[str(i) for i in idx], file_sizes=[1] * len(idx),
                                mtimes_ns=[0] * len(idx), features=x[idx])
    return Path(directory)


@pytest.fixture()
def shards(tmp_path):
    return write_clusters(tmp_path / "shards", unlabelled=5)


def test_stratified_split_is_stratified_and_seeded():
    labels = np.array(["a"] * 60 + ["b"] * 30 + ["c"] * 10, dtype=object)
    s1 = stratified_split(labels, seed=3)
    s2 = stratified_split(labels, seed=3)
    s3 = stratified_split(labels, seed=4)
    for k in s1:
        np.testing.assert_array_equal(s1[k], s2[k])
    assert any(not np.array_equal(s1[k], s3[k]) for k in s1)
    all_idx = np.concatenate([s1["train"], s1["validation"], s1["test"]])
    assert sorted(all_idx.tolist()) == list(range(100))
    for cls, n in (("a", 60), ("b", 30), ("c", 10)):
        in_test = (labels[s1["test"]] == cls).sum()
        assert abs(in_test - 0.15 * n) <= 1
    tiny = stratified_split(np.array(["a", "a", "b", "b", "b"], dtype=object), seed=0)
    assert set(labels_of(tiny["train"], ["a", "a", "b", "b", "b"])) == {"a", "b"}


def labels_of(idx, labels):
    return [labels[i] for i in idx]


def test_unlabelled_rows_are_counted_and_left_out(shards):
    ds = load_dataset(shards)
    assert ds.unlabelled == 5 and len(ds.labels) == 120 and ds.features.dtype == np.float32
    assert ds.classes == ["class_0", "class_1", "class_2"]


def test_training_is_reproducible_and_writes_a_complete_run(shards, tmp_path):
    r1 = train(shards, tmp_path / "run1", seed=7, **FAST)
    r2 = train(shards, tmp_path / "run2", seed=7, **FAST)
    assert r1.metrics["test"]["accuracy"] == r2.metrics["test"]["accuracy"]
    np.testing.assert_allclose(r1.history["loss"], r2.history["loss"], rtol=1e-5)
    run = Path(r1.run_dir)
    for f in ("model.keras", "labels.json", "shard_metadata.json", "metrics.json", "curves.png",
              "confusion_matrix.png", "run.json", "config.json"):
        assert (run / f).is_file(), f
    m = json.loads((run / "metrics.json").read_text())
    for split in ("validation", "test"):
        assert {"accuracy", "macro_f1", "per_class", "confusion_matrix"} <= set(m[split])
        assert set(m[split]["per_class"]["class_0"]) == {"precision", "recall", "f1", "support"}
    assert m["test"]["accuracy"] > 0.9 > m["majority_rate_test"]
    assert ShardMetadata.from_json((run / "shard_metadata.json").read_text()).backbone == "fake_backbone"
    assert json.loads((run / "labels.json").read_text()) == ["class_0", "class_1", "class_2"]


@pytest.mark.parametrize("hidden", [(), (32,), (32, 16)])
def test_linear_and_mlp_heads(shards, tmp_path, hidden):
    r = train(shards, tmp_path / "run", hidden=hidden, **FAST)
    model = load_run(r.run_dir).model
    dense = [layer for layer in model.layers if layer.__class__.__name__ == "Dense"]
    assert len(dense) == len(hidden) + 1
    assert r.metrics["test"]["accuracy"] > 0.9


def test_save_reload_gives_identical_predictions(shards, tmp_path):
    r = train(shards, tmp_path / "run", **FAST)
    ds = load_dataset(shards)
    from stage2_classify.train import FittedHead  # noqa: F401  (API is importable)

    first = load_run(r.run_dir).model.predict(ds.features, verbose=0)
    second = load_run(r.run_dir).model.predict(ds.features, verbose=0)
    np.testing.assert_array_equal(first, second)


def test_predict_output_schema_parquet_and_csv(shards, tmp_path):
    r = train(shards, tmp_path / "run", **FAST)
    out = predict(shards, r.run_dir, tmp_path / "preds.parquet")
    table = pq.read_table(out)
    assert table.column_names == ["path", "label", "predicted", "probability", "prob_class_0", "prob_class_1",
                                  "prob_class_2"]
    assert table.num_rows == 125
    probs = np.stack([table.column(f"prob_class_{k}").to_numpy() for k in range(3)], axis=1)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)
    csv_out = predict(shards, r.run_dir, tmp_path / "preds.csv")
    header = Path(csv_out).read_text().splitlines()[0]
    assert header.startswith('"path","label","predicted","probability"')
    report = evaluate(shards, r.run_dir, verbose=0)
    assert report["n"] == 120 and report["unlabelled_rows"] == 5 and report["accuracy"] > 0.9


def test_mixed_shards_are_refused_naming_both(tmp_path):
    write_clusters(tmp_path / "mixed", backbone="backbone_a", shards=1)
    other = write_clusters(tmp_path / "other", backbone="backbone_b", shards=1)
    (other / "part-test-00000.parquet").rename(tmp_path / "mixed" / "part-zzz-00000.parquet")
    with pytest.raises(shardformat.IncompatibleShardsError) as err:
        load_dataset(tmp_path / "mixed")
    assert "backbone_a" in str(err.value) and "backbone_b" in str(err.value)


def test_predict_refuses_shards_of_another_backbone(shards, tmp_path):
    r = train(shards, tmp_path / "run", **FAST)
    other = write_clusters(tmp_path / "other", backbone="another_backbone")
    with pytest.raises(shardformat.IncompatibleShardsError, match="another_backbone"):
        predict(other, r.run_dir, tmp_path / "p.parquet")


def test_incomplete_run_directory_is_refused(shards, tmp_path):
    r = train(shards, tmp_path / "run", **FAST)
    (Path(r.run_dir) / "run.json").unlink()
    with pytest.raises(RunDirError, match="not a complete training run"):
        predict(shards, r.run_dir, tmp_path / "p.parquet")


def test_sweep_table_sorted_by_validation(shards, tmp_path):
    rows = sweep(shards, tmp_path / "sweep", hidden=[(0,), (16,)], dropout=[0.0, 0.3], learning_rate=[1e-2],
                 epochs=5, batch_size=64, verbose=0)
    assert len(rows) == 4
    scores = [r["val_accuracy"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert {r["hidden"] for r in rows} == {"linear", "16"}
    assert (tmp_path / "sweep" / "sweep.csv").is_file() and (tmp_path / "sweep" / "sweep.json").is_file()


def test_imbalanced_classes_get_balanced_weights(tmp_path):
    y = np.array([0] * 90 + [1] * 10)
    w = class_weights(y, 2, "auto")
    assert w is not None and w[1] == pytest.approx(5.0) and w[0] == pytest.approx(100 / 180)
    assert class_weights(np.array([0] * 50 + [1] * 45), 2, "auto") is None
    assert class_weights(y, 2, "none") is None
    shards = write_clusters(tmp_path / "imb", counts=(150, 12), seed=1)
    r = train(shards, tmp_path / "run", **FAST)
    config = json.loads((Path(r.run_dir) / "config.json").read_text())
    assert config["class_weight_used"] is not None
    assert r.metrics["test"]["per_class"]["class_1"]["recall"] > 0.5


def test_user_split_file(shards, tmp_path):
    ds = load_dataset(shards)
    split_csv = tmp_path / "split.csv"
    names = ["train", "val", "test"]
    split_csv.write_text("path,split\n" + "".join(f"{p},{names[i % 3]}\n" for i, p in enumerate(ds.paths)))
    split = split_from_file(ds.paths, split_csv)
    assert len(split["train"]) == 40 and len(split["validation"]) == 40 and len(split["test"]) == 40
    r = train(shards, tmp_path / "run", split_file=str(split_csv), **FAST)
    assert r.metrics["test"]["n"] == 40


def test_errors_are_clear(tmp_path):
    with pytest.raises(DatasetError, match="no feature shards"):
        load_dataset(tmp_path / "empty")
    one = write_clusters(tmp_path / "one", counts=(20,))
    with pytest.raises(DatasetError, match="only one class"):
        load_dataset(one)


def test_metrics_by_hand():
    rep = classification_report(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), ["a", "b"])
    assert rep["accuracy"] == 0.75
    assert rep["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert rep["confusion_matrix"] == [[1, 1], [0, 2]]


def test_cli_help_and_train(shards, tmp_path):
    for cmd in ([], ["train"], ["predict"], ["evaluate"], ["sweep"]):
        r = subprocess.run([sys.executable, "-m", "stage2_classify", *cmd, "--help"], capture_output=True,
                           text=True, cwd=REPO, timeout=120)
        assert r.returncode == 0 and "usage" in r.stdout
    r = subprocess.run([sys.executable, "-m", "stage2_classify", "train", "--shards", str(shards), "--out",
                        str(tmp_path / "cli_run"), "--epochs", "5", "--quiet"], capture_output=True, text=True,
                       cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "test" in r.stdout and "accuracy" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "stage2_classify", "predict", "--shards", str(shards), "--model",
                          str(tmp_path / "nope"), "--out", str(tmp_path / "x.csv")], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert bad.returncode == 1 and "no such run directory" in bad.stderr
