"""Stage 2 training: reproducibility, run directory, linear and MLP heads, imbalanced classes, atomic writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shardformat import ShardMetadata
from stage2_classify import DatasetError, RunDirError, TrainOptions, load_dataset, load_run, train
from tests.support.synthetic import write_synthetic_shards

REPO = Path(__file__).resolve().parents[2]
FAST = dict(head="mlp", epochs=15, patience=3, batch_size=32, learning_rate=1e-2, progress=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("train") / "shards", unlabelled=5)


@pytest.fixture(scope="module")
def dataset(shards):
    return load_dataset(shards)


def test_same_seed_same_split_and_numbers(shards, tmp_path):
    r1 = train(shards, tmp_path / "a", seed=7, **FAST)
    r2 = train(shards, tmp_path / "b", seed=7, **FAST)
    r3 = train(shards, tmp_path / "c", seed=8, **FAST)
    split = [(Path(r.run_dir) / "split.csv").read_text() for r in (r1, r2, r3)]
    assert split[0] == split[1] and split[0] != split[2]
    assert r1.history == r2.history  # bit-identical losses, epoch by epoch
    assert r1.metrics["test"] == r2.metrics["test"] and r1.metrics["validation"] == r2.metrics["validation"]
    assert r1.history != r3.history


def test_run_directory_contents(shards, tmp_path):
    r = train(shards, tmp_path / "run", **FAST)
    run = Path(r.run_dir)
    assert sorted(p.name for p in run.iterdir()) == sorted([
        "model.keras", "labels.json", "shard_metadata.json", "config.json", "metrics.json", "history.json",
        "split.csv", "predictions.parquet", "curves.png", "confusion_matrix.png", "reliability.png", "run.json",
        "ood.npz", "report.html"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # nothing left behind
    for png in ("curves.png", "confusion_matrix.png", "reliability.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((run / "metrics.json").read_text())
    for split in ("validation", "test"):
        assert {"accuracy", "balanced_accuracy", "macro_f1", "roc_auc_ovr", "log_loss", "ece", "ci95", "per_class",
                "confusion_matrix", "n"} <= set(m[split])
        assert set(m[split]["per_class"]["class_0"]) == {"precision", "recall", "specificity", "f1", "support",
                                                         "roc_auc"}
        assert np.asarray(m[split]["confusion_matrix"]).sum() == m[split]["n"]
    assert m["test"]["accuracy"] > 0.9 > m["majority_rate_test"]
    meta = ShardMetadata.from_json((run / "shard_metadata.json").read_text())
    assert meta.backbone == "synthetic" and meta.feature_dim == 16
    assert json.loads((run / "labels.json").read_text()) == ["class_0", "class_1", "class_2"]
    config = json.loads((run / "config.json").read_text())
    assert config["hidden"] == [256] and config["unlabelled_rows_left_out"] == 5
    sizes = config["split_sizes"]
    assert sum(sizes.values()) == 120 and all(abs(sizes[k] - 18) <= 4 for k in ("validation", "test"))
    assert config["split"]["method"] == "content-hash" and len(config["labels_sha256"]) == 64
    history = json.loads((run / "history.json").read_text())
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history)
    assert "5 unlabelled rows left out" in r.summary and "test" in r.summary


@pytest.mark.parametrize("hidden", [(), (32,), (32, 16)])
def test_linear_and_mlp_heads(shards, dataset, tmp_path, hidden):
    r = train(shards, tmp_path / "run", hidden=hidden, dataset=dataset, **FAST)
    model = load_run(r.run_dir).model
    dense = [layer for layer in model.layers if layer.__class__.__name__ == "Dense"]
    assert [layer.units for layer in dense] == [*hidden, 3]
    assert any(layer.__class__.__name__ == "Normalization" for layer in model.layers)  # standardisation inside
    assert sum(layer.__class__.__name__ == "Dropout" for layer in model.layers) == len(hidden)
    assert r.metrics["test"]["accuracy"] > 0.9


def test_imbalanced_classes_get_balanced_weights(tmp_path):
    shards = write_synthetic_shards(tmp_path / "imb", counts=(150, 12), spread=1.2, seed=1)
    r = train(shards, tmp_path / "run", **FAST)
    config = json.loads((Path(r.run_dir) / "config.json").read_text())
    assert config["class_weight_used"]["1"] > 5 * config["class_weight_used"]["0"]
    assert "balanced class weights" in r.summary
    assert r.metrics["test"]["per_class"]["class_1"]["recall"] > 0.5
    off = train(shards, tmp_path / "off", class_weight="none", **FAST)
    assert json.loads((Path(off.run_dir) / "config.json").read_text())["class_weight_used"] is None


def test_a_failed_training_leaves_no_run_directory(shards, dataset, tmp_path, monkeypatch):
    import stage2_classify.reports.plots as plots

    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed while writing the run directory

    monkeypatch.setattr(plots, "plot_confusion", boom)
    with pytest.raises(KeyboardInterrupt):
        train(shards, tmp_path / "run", dataset=dataset, **FAST)
    assert list(tmp_path.iterdir()) == []


def test_replaces_an_earlier_run_but_never_a_foreign_directory(shards, dataset, tmp_path):
    first = train(shards, tmp_path / "run", dataset=dataset, **{**FAST, "epochs": 2})
    second = train(shards, tmp_path / "run", dataset=dataset, **FAST)
    assert first.run_dir == second.run_dir
    assert json.loads((Path(second.run_dir) / "config.json").read_text())["epochs"] == 15
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("do not delete")
    with pytest.raises(RunDirError, match="not a stage-2 run"):
        train(shards, foreign, dataset=dataset, **FAST)
    assert (foreign / "thesis.tex").read_text() == "do not delete"


def test_options_are_validated(shards, tmp_path):
    with pytest.raises(ValueError, match="dropout"):
        TrainOptions(dropout=1.5)
    with pytest.raises(ValueError, match="class_weight"):
        TrainOptions(class_weight="sometimes")
    with pytest.raises(ValueError, match="hidden sizes must be positive"):
        TrainOptions(hidden=(0, 5))
    with pytest.raises(DatasetError):
        train(tmp_path / "nothing", tmp_path / "run", **FAST)


def test_refuses_keras_already_on_another_backend():
    # Only torch is installed here, so a keras "already imported with jax" is a stand-in module.
    fake = ("import sys, types\nk = types.ModuleType('keras')\n"
            "k.backend = types.SimpleNamespace(backend=lambda: 'jax')\nsys.modules['keras'] = k\n")
    r = subprocess.run([sys.executable, "-c", fake + "import stage2_classify"], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode != 0 and "BackendError" in r.stderr and "'jax' backend" in r.stderr
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    code = "import stage2_classify\nstage2_classify.train('x', 'y')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode != 0 and "KERAS_BACKEND is 'jax'" in r.stderr
