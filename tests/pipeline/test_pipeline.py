"""The orchestrator: skip logic, predict end to end, compare on two backbones, CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import pipeline
from tests.support.helpers import make_image_tree, make_tiny_onnx

REPO = Path(__file__).resolve().parents[2]
TRAIN = dict(epochs=10, patience=3, batch_size=16, learning_rate=1e-2)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_tree(tmp_path_factory.mktemp("pipe") / "images", per_class=6)


def test_run_extracts_once_and_retrains_cheaply(images, tmp_path, monkeypatch):
    work = tmp_path / "work"
    first = pipeline.run(images, work, train_options=TRAIN, progress=False)
    assert first.extraction["extracted"] == 18
    assert Path(first.features_dir) == work / "features" / "efficientnet_lite0"
    assert (Path(first.run_dir) / "model.keras").is_file()
    assert first.metrics["test"]["accuracy"] >= 0.5  # 3 photo classes, tiny test split

    # Second run: nothing to extract; the decode/inference path must not even start.
    import stage1_extract.decoding.pool as loader

    monkeypatch.setattr(loader.DecodePool, "__init__", lambda *a, **k: pytest.fail("extraction re-ran"))
    second = pipeline.run(images, work, train_options={**TRAIN, "hidden": (), "seed": 1}, run_name="linear",
                          progress=False)
    assert second.extraction["extracted"] == 0 and second.extraction["already_done"] == 18
    assert Path(second.run_dir).name == "linear"
    cfg = json.loads((Path(second.run_dir) / "config.json").read_text())
    assert cfg["hidden"] == [] and cfg["seed"] == 1
    assert "all cached" in second.format()


def test_other_backbone_gets_its_own_cache(images, tmp_path):
    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    work = tmp_path / "work"
    r = pipeline.run(images, work, onnx=tiny, train_options=TRAIN, progress=False)
    assert Path(r.features_dir).parent == work / "features"
    assert Path(r.features_dir).name.startswith("onnx-tiny-")
    assert not (work / "features" / "efficientnet_lite0").exists()


def test_predict_end_to_end(images, tmp_path):
    work = tmp_path / "work"
    trained = pipeline.run(images, work, train_options=TRAIN, progress=False)
    new = tmp_path / "new"
    new.mkdir()
    for src in sorted(images.glob("*/*_000.jpg")):
        (new / f"unlabelled_{src.parent.name}.jpg").write_bytes(src.read_bytes())
    out = tmp_path / "preds.parquet"
    pipeline.predict(new, trained.run_dir, out, progress=False)
    table = pq.read_table(out)
    assert table.num_rows == 3
    assert {"path", "predicted", "probability", "top1_label", "top3_probability", "unknown", "ood_score",
            "error"} <= set(table.column_names)
    assert set(table.column("path").to_pylist()) == {str(new / "unlabelled_cat.jpg"), str(new / "unlabelled_coffee.jpg"),
                                                     str(new / "unlabelled_space.jpg")}  # as given: folder + name
    assert set(table.column("predicted").to_pylist()) <= {"cat", "coffee", "space"}


def test_predict_with_a_user_onnx_model_needs_the_file(images, tmp_path):
    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    trained = pipeline.run(images, tmp_path / "work", onnx=tiny, train_options=TRAIN, progress=False)
    with pytest.raises(ValueError, match="--onnx"):
        pipeline.predict(images, trained.run_dir, tmp_path / "p.csv", progress=False)
    frame = pipeline.predict(images, trained.run_dir, tmp_path / "p.csv", onnx=tiny, progress=False)
    assert len(frame) == 18 and (tmp_path / "p.csv").read_text().count("\n") == 19


def test_compare_two_backbones(images, tmp_path):
    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    rows = pipeline.compare(images, ["efficientnet_lite0", str(tiny)], tmp_path / "cmp", train_options=TRAIN,
                            progress=False)
    assert [r["backbone"] for r in rows][0] == "efficientnet_lite0" and len(rows) == 2  # in the order given
    for r in rows:
        assert 0 <= r["val_accuracy"] <= 1 and r["extract_images_per_second"] > 0
    # ranked by cross-validated macro-F1 (same folds for both), the runner-up paired against the best
    best, second = sorted(rows, key=lambda r: r["rank"])
    assert [best["rank"], second["rank"]] == [1, 2] and best["cv_macro_f1"] >= second["cv_macro_f1"]
    assert 0 <= best["cv_macro_f1_low"] <= best["cv_macro_f1"] <= best["cv_macro_f1_high"] <= 1
    assert second["diff_low"] <= second["diff_vs_best"] <= second["diff_high"]
    assert second["indistinguishable_from_best"] == (second["diff_low"] <= 0 <= second["diff_high"])
    assert "ranked by cross-validated macro-F1" in (tmp_path / "cmp" / "compare.txt").read_text()
    for f in ("compare.csv", "compare.json", "compare.png"):
        assert (tmp_path / "cmp" / f).stat().st_size > 0
    again = pipeline.compare(images, ["efficientnet_lite0"], tmp_path / "cmp", train_options=TRAIN, progress=False)
    assert again[0]["extract_images_per_second"] == rows[0]["extract_images_per_second"]  # from the cache record


def test_cli(images, tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, cwd=REPO,
                       timeout=60)
    assert r.returncode == 0 and "compare" in r.stdout
    r = subprocess.run([sys.executable, "-m", "pipeline", "run", "--images", str(images), "--workdir",
                        str(tmp_path / "w"), "--epochs", "5", "--hidden", "0"], capture_output=True, text=True,
                       cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "pipeline done" in r.stdout and "test accuracy" in r.stdout and "model.keras" in r.stdout
    run_dir = tmp_path / "w" / "runs" / "efficientnet_lite0" / "latest"
    one = sorted(images.glob("cat/*.jpg"))[0]
    r = subprocess.run([sys.executable, "-m", "pipeline", "predict", "--images", str(one), "--model", str(run_dir),
                        "--out", str(tmp_path / "p.csv"), "--no-progress", "--top-k", "2"], capture_output=True,
                       text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "1 predictions written" in r.stdout and "extracting" not in r.stderr
    assert (tmp_path / "p.csv").read_text().splitlines()[1].startswith(f'"{one}",')


def test_cli_hidden_uses_stage2s_parser():
    from pipeline.cli import build_parser

    args = build_parser().parse_args(["run", "--images", "x", "--workdir", "w", "--hidden", "512x256"])
    assert args.hidden == (512, 256)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--images", "x", "--workdir", "w", "--hidden", "-3"])
