"""Issue 21: one head definition (auto / linear / mlp) shared by train, cv and sweep; auto's choice; groups made
visible (regrouping, warnings) and per-group results with intervals that resample groups."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import shardformat
from stage2_classify import TrainOptions, cross_validate, evaluate, load_dataset, train
from stage2_classify.data.groups import group_report, regroup
from stage2_classify.options import L2_GRID
from stage2_classify.evaluation.groups import cluster_bootstrap, predictions_by_group
from stage2_classify.training.fit import make_split, predict_proba
from stage2_classify.training.heads import fit_head
from tests.support.synthetic import synthetic_metadata, write_synthetic_shards

FAST = dict(epochs=25, patience=5, progress=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("heads") / "shards", counts=(40, 40, 30))


@pytest.fixture(scope="module")
def xor_shards(tmp_path_factory):
    """Two classes no linear head can separate (the sign of x0·x1), plus noise columns: the MLP must win."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 4)).astype(np.float32)
    y = np.where(x[:, 0] * x[:, 1] > 0, "same", "diff")
    folder = tmp_path_factory.mktemp("xor") / "shards"
    shardformat.write_shard(folder, "part-xor-00000.parquet", synthetic_metadata(4),
                            paths=[f"{c}/img_{i:05d}.png" for i, c in enumerate(y)], labels=list(y),
                            content_ids=[f"xor-{i}" for i in range(len(y))], file_sizes=[1] * len(y),
                            mtimes_ns=[0] * len(y), features=x)
    return folder


def _groups_file(shards: Path, path: Path, small_class: str = "class_2", small: int = 3) -> Path:
    ds = load_dataset(shards)
    rows = []
    for p in ds.paths:
        cls, i = str(p).split("/")[0], int(str(p)[-9:-4])
        rows.append((p, f"{cls}-patient{i % (small if cls == small_class else 12)}"))
    pd.DataFrame(rows, columns=["path", "group"]).to_csv(path, index=False)
    return path


def test_the_linear_head_is_a_keras_model_with_the_fitted_probabilities(shards):
    from stage2_classify.training.head import linear_to_keras
    from stage2_classify.training.linear import fit_linear

    ds = load_dataset(shards)
    x = ds.features.copy()
    x[:, 3] = 5.0  # a constant column: the variance floor must not change the probabilities
    head = fit_linear(x, ds.y, len(ds.classes), l2=1e-2)
    model = linear_to_keras(head, len(ds.classes))
    np.testing.assert_allclose(predict_proba(model, x), head.predict_proba(x), atol=1e-5)


def test_auto_keeps_the_tuned_linear_head_when_the_mlp_is_no_better(shards, tmp_path):
    r = train(shards, tmp_path / "run", **FAST)
    choice = r.metrics["head"]
    assert choice["head"] == "linear" and choice["rule"] == "auto"
    assert choice["linear"]["val_macro_f1"] is not None and choice["mlp"]["val_macro_f1"] is not None
    tried = [t["l2"] for t in choice["linear"]["l2_grid"]]
    assert tried == list(L2_GRID[:len(tried)]) and choice["linear"]["l2"] in tried  # swept on validation
    assert "linear head kept" in r.summary and "MLP 256" in r.summary  # both validation scores named
    dense = [layer for layer in r.model.layers if layer.__class__.__name__ == "Dense"]
    assert [layer.units for layer in dense] == [3]  # model.keras holds the linear head
    assert json.loads((Path(r.run_dir) / "metrics.json").read_text())["head"]["head"] == "linear"


def test_auto_keeps_the_mlp_when_it_beats_the_linear_head_beyond_chance(xor_shards):
    ds = load_dataset(xor_shards)
    opts = TrainOptions(hidden=(32,), learning_rate=1e-2, epochs=40, patience=8)
    split = make_split(ds, opts)
    fitted = fit_head(ds, split, opts, progress=False)
    assert fitted.kind == "mlp" and fitted.choice["head"] == "mlp"
    gain = fitted.choice["mlp"]["gain_over_linear"]
    assert gain["ci95"][0] > 0 and fitted.choice["mlp"]["val_macro_f1"] > fitted.choice["linear"]["val_macro_f1"]
    assert fitted.choice["mlp"]["batch_size"] == 32  # scaled to ~420 training rows, not 256


def test_cv_fits_the_head_train_fits(shards):
    res = cross_validate(shards, folds=3, **{k: v for k, v in FAST.items() if k != "progress"}, progress=False)
    assert res.head == "auto"
    for s in res.summary.values():  # intervals of bounded metrics stay inside [0, 1]
        if s["ci95"] and s is not res.summary["log_loss"]:
            assert 0 <= s["ci95"][0] <= s["ci95"][1] <= 1
    fast = cross_validate(shards, folds=3, head="fast-linear", progress=False)
    assert fast.head == "fast-linear" and len(fast.oof) == len(res.oof)


def test_groups_are_visible_warned_about_and_scored_per_group(shards, tmp_path):
    groups = _groups_file(shards, tmp_path / "groups.csv")
    r = train(shards, tmp_path / "run", groups=groups, head="linear", progress=False)
    g = r.metrics["groups"]
    assert g["grouped"] and "--groups" in g["source"]
    assert g["units_per_class"]["class_2"]["all"] == 3 and g["units_per_class"]["class_0"]["all"] == 12
    assert any("fewer than 5 groups" in w and "class_2" in w for w in g["warnings"])
    assert "group-keyed split" in r.summary and "WARNING" in r.summary and "per group  test" in r.summary
    table = pd.read_csv(Path(r.run_dir) / "split.csv")
    assert table.groupby("group")["split"].nunique().max() == 1  # regrouped in stage 2, never divided
    per_group = pq.read_table(Path(r.run_dir) / "group_predictions.parquet").to_pandas()
    assert per_group.groupby("split")["group"].nunique().sum() == 27 and per_group["group"].is_unique
    prob_columns = [f"prob_class_{k}" for k in range(3)]
    np.testing.assert_allclose(per_group[prob_columns].sum(axis=1), 1.0, atol=1e-5)
    test = r.metrics["by_group"]["test"]
    assert test["group_level"]["n"] == (per_group["split"] == "test").sum() == test["groups"]
    for block in (test["group_level"]["ci95"], test["image_level_cluster_bootstrap"]["ci95"]):
        assert all(ci is None or 0 <= ci[0] <= ci[1] <= 1 for ci in block.values())
    html = (Path(r.run_dir) / "report.html").read_text()
    assert "Groups" in html and "fewer than 5 groups" in html and "Per group" in html
    ev = evaluate(shards, r.run_dir, progress=False)  # the run's own regrouping options, from config.json
    assert ev.metrics["by_group"]["groups"] == 27 and "per group" in ev.format()


def test_a_split_without_a_class_s_groups_is_warned_about(shards):
    ds = load_dataset(shards)
    ds = regroup(ds, group_regex=r"^(class_\d)")  # one group per class: every split lacks two classes
    split = make_split(ds, TrainOptions())
    report = group_report(ds, split, "test")
    assert sum("has none of the groups of" in w for w in report["warnings"]) >= 2
    assert all(e["all"] == 1 for e in report["units_per_class"].values())


def test_mean_probability_per_group_and_cluster_bootstrap():
    frame = pd.DataFrame({"path": ["a/p1_1.png", "a/p1_2.png", "b/p2_1.png", "b/x.png"],
                          "predicted": ["a", "b", "b", None],
                          "prob_a": [0.9, 0.4, 0.2, np.nan], "prob_b": [0.1, 0.6, 0.8, np.nan]})
    by_group = predictions_by_group(frame, group_regex=r"(p\d)_").set_index("group")
    assert list(by_group.index) == ["p1", "p2"]  # the unusable row is left out
    assert by_group.loc["p1", "images"] == 2 and by_group.loc["p1", "prob_a"] == pytest.approx(0.65)
    assert by_group.loc["p1", "predicted"] == "a"
    y = np.array([0, 0, 0, 1, 1, 1])
    pred = np.array([0, 0, 1, 1, 1, 0])
    out = cluster_bootstrap(y, pred, np.array(["g1", "g1", "g2", "g3", "g3", "g4"]), 2, resamples=200)
    assert out["groups"] == 4 and out["accuracy"] == pytest.approx(4 / 6)
    assert all(0 <= ci[0] <= ci[1] <= 1 for ci in out["ci95"].values())


def test_cli_evaluate_and_predict_give_per_group_results(shards, tmp_path, capsys):
    from stage2_classify.cli import main

    run = tmp_path / "run"
    assert main(["train", "--features", str(shards), "--out", str(run), "--head", "linear", "--quiet"]) == 0
    capsys.readouterr()
    regex = r"img_\d*(\d)\.png"  # ten groups by the path's last digit (across classes: mixed labels)
    assert main(["evaluate", "--features", str(shards), "--run", str(run), "--group-regex", regex]) == 0
    assert "per group  evaluated: 10 groups, 10 with mixed labels" in capsys.readouterr().out
    out = tmp_path / "p.parquet"
    assert main(["predict", "--features", str(shards), "--run", str(run), "--out", str(out), "--group-regex",
                 regex]) == 0
    assert "10 groups written to" in capsys.readouterr().out
    table = pd.read_parquet(tmp_path / "p.groups.parquet")
    assert len(table) == 10 and table["images"].sum() == 110 and "prob_class_0" in table.columns
    # the Python API gives the same per-group rows as the CLI
    from stage2_classify import Classifier

    images, by_group = Classifier.load(run).predict_groups(shards, group_regex=regex, progress=False)
    assert len(images) == 110 and len(by_group) == 10
    np.testing.assert_allclose(by_group.sort_values("group")["prob_class_0"].to_numpy(float),
                               table.sort_values("group")["prob_class_0"].to_numpy(float), atol=1e-6)
