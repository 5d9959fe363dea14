"""Stage 2 prediction: save/reload gives identical predictions, output schema, refusing foreign shards and runs."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import shardformat
from stage2_classify import RunDirError, evaluate, load_dataset, load_run, predict, train
from tests.support.synthetic import write_synthetic_shards

FAST = dict(epochs=15, patience=3, batch_size=32, learning_rate=1e-2, progress=False)
CLASSES = ["class_0", "class_1", "class_2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("predict") / "shards", unlabelled=5)


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    return train(shards, tmp_path_factory.mktemp("predict_run") / "run", **FAST)


def test_save_reload_gives_identical_predictions(shards, trained):
    x = load_dataset(shards).features
    in_memory = trained.model.predict(x, verbose=0)
    reloaded = load_run(trained.run_dir)
    np.testing.assert_array_equal(reloaded.model.predict(x, verbose=0), in_memory)
    np.testing.assert_array_equal(load_run(trained.run_dir).model.predict(x, verbose=0), in_memory)
    assert reloaded.classes == CLASSES and reloaded.metadata.backbone == "synthetic"
    # standardisation travels inside the model: raw vectors in, probabilities out
    np.testing.assert_allclose(in_memory.sum(axis=1), 1.0, rtol=1e-5)


def test_model_file_is_plain_keras_format_with_nothing_to_unpickle(trained):
    with zipfile.ZipFile(Path(trained.run_dir) / "model.keras") as z:
        names = set(z.namelist())
        assert {"config.json", "metadata.json", "model.weights.h5"} <= names
        config = z.read("config.json").decode()
    assert "lambda" not in config.lower() and "pickle" not in config.lower()


def test_predict_parquet_schema_and_values(shards, trained, tmp_path):
    out = tmp_path / "preds.parquet"
    frame = predict(shards, trained.run_dir, out, all_probabilities=True, top_k=2)
    table = pq.read_table(out)
    assert table.schema.names == ["path", "label", "predicted", "probability", "top1_label", "top1_probability",
                                  "top2_label", "top2_probability", "unknown", "ood_score",
                                  *[f"prob_{c}" for c in CLASSES], "error"]
    assert table.to_pandas().equals(frame.astype(table.to_pandas().dtypes))
    assert table.schema.field("path").type == pa.string() and table.schema.field("predicted").type == pa.string()
    assert all(table.schema.field(f"prob_{c}").type == pa.float32() for c in CLASSES)
    assert table.num_rows == 125  # every row, labelled or not
    assert table.column("label").null_count == 5
    probs = np.stack([table.column(f"prob_{c}").to_numpy() for c in CLASSES], axis=1)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(table.column("probability").to_numpy(), probs.max(axis=1))
    predicted = np.asarray(table.column("predicted").to_pylist())
    np.testing.assert_array_equal(predicted, np.asarray(CLASSES)[probs.argmax(axis=1)])
    labels = np.asarray(table.column("label").to_pylist(), dtype=object)
    known = labels != None  # noqa: E711
    assert (predicted[known] == labels[known]).mean() > 0.9
    # the paths are the shards' paths, each once
    assert sorted(table.column("path").to_pylist()) == sorted(shardformat.read_features(shards).paths.tolist())


def test_predict_csv_when_the_name_ends_in_csv(shards, trained, tmp_path):
    out = tmp_path / "sub" / "preds.CSV"
    predict(shards, trained.run_dir, out)
    assert Path(out).read_text().splitlines()[0] == (
        '"path","label","predicted","probability","top1_label","top1_probability","top2_label","top2_probability",'
        '"top3_label","top3_probability","unknown","ood_score","error"')
    table = pacsv.read_csv(out)
    assert table.num_rows == 125
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.startswith(".tmp-")]


def test_predict_refuses_shards_of_another_backbone(trained, tmp_path):
    other = write_synthetic_shards(tmp_path / "other", backbone="another_backbone")
    with pytest.raises(shardformat.IncompatibleShardsError, match="another_backbone"):
        predict(other, trained.run_dir, tmp_path / "p.parquet")
    with pytest.raises(shardformat.IncompatibleShardsError):
        evaluate(other, trained.run_dir)
    assert not (tmp_path / "p.parquet").exists()


def test_predict_refuses_an_incomplete_or_missing_run(shards, trained, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained.run_dir, copy)
    (copy / "run.json").unlink()  # what a killed training would look like without the marker
    with pytest.raises(RunDirError, match="no run.json completion marker"):
        predict(shards, copy, tmp_path / "p.parquet")
    with pytest.raises(RunDirError, match="no such run directory"):
        predict(shards, tmp_path / "nope", tmp_path / "p.parquet")


def test_evaluate_counts_unlabelled_and_unknown_labels(shards, trained, tmp_path):
    with pytest.warns(UserWarning, match="not a held-out estimate"):  # these are the training shards
        report = evaluate(shards, trained.run_dir, out=tmp_path / "m.json").metrics
    assert report["n"] == 120 and report["unlabelled_rows"] == 5 and report["accuracy"] > 0.9
    assert json.loads((tmp_path / "m.json").read_text())["n"] == 120
    novel = write_synthetic_shards(tmp_path / "novel", counts=(10, 10, 10, 6), seed=0)  # class_3 is new
    report = evaluate(novel, trained.run_dir).metrics
    assert report["unknown_labels"] == ["class_3"] and report["unknown_label_rows"] == 6 and report["n"] == 30
