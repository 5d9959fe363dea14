"""The Classifier API and prediction from images (one file, a folder, a list), on a tiny ONNX backbone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import shardformat
from stage1_extract import extract
from stage2_classify import Classifier, predict, train
from tests.support.synthetic import write_synthetic_shards
from tests.support.helpers import make_image_tree, make_tiny_onnx

REPO = Path(__file__).resolve().parents[2]
FAST = dict(epochs=10, patience=3, batch_size=8, learning_rate=1e-2, progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("clf")
    images = make_image_tree(root / "images", per_class=8)
    tiny = make_tiny_onnx(root / "tiny.onnx")
    extract(images, root / "features", onnx=tiny, input_size=32, progress=False)
    result = train(root / "features", root / "run", **FAST)
    return dict(root=root, images=images, tiny=tiny, run=Path(result.run_dir), shards=root / "features")


def test_classifier_api(setup):
    clf = Classifier.load(setup["run"])
    assert clf.classes == ["cat", "coffee", "space"] and clf.run_dir == setup["run"]
    assert clf.metadata.backbone == "onnx:tiny.onnx" and clf.metadata.feature_dim == 8
    assert "3 classes" in repr(clf)
    x = shardformat.read_features(setup["shards"]).features
    probs = clf.predict_proba(x)
    assert probs.shape == (len(x), 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
    frame = clf.predict(x, top_k=2)  # vectors in memory
    assert isinstance(frame, pd.DataFrame) and len(frame) == len(x) and frame["path"].isna().all()
    np.testing.assert_allclose(frame["probability"].to_numpy(float), probs.max(axis=1), rtol=1e-6)
    assert list(frame["top1_label"]) == list(np.asarray(clf.classes)[probs.argmax(axis=1)])
    assert (frame["top1_probability"] >= frame["top2_probability"]).all()
    with pytest.raises(ValueError, match=r"\(n, 8\)"):
        clf.predict(np.zeros((2, 5), np.float32))


def test_predict_from_a_folder_paths_as_given_with_labels(setup):
    clf = Classifier.load(setup["run"])
    frame = clf.predict(str(setup["images"]), onnx=setup["tiny"], progress=False)
    assert len(frame) == 24
    assert frame["path"].iloc[0] == os.path.join(str(setup["images"]), "cat", "cat_000.jpg")
    assert set(frame["label"]) == {"cat", "coffee", "space"} and frame["error"].isna().all()
    assert {"predicted", "probability", "top3_label", "top3_probability", "unknown", "ood_score"} <= set(frame)
    assert frame["unknown"].dtype == "boolean" and frame["unknown"].notna().all()
    # the same vectors as the shards the model was trained on: same predictions as predicting on the shards
    on_shards = clf.predict(setup["shards"]).set_index("path")
    rel = frame["path"].str.slice(len(str(setup["images"])) + 1)
    assert list(on_shards.loc[rel, "predicted"]) == list(frame["predicted"])
    # second call: everything cached, nothing extracted again
    again = clf.predict(str(setup["images"]), onnx=setup["tiny"], progress=False)
    pd.testing.assert_frame_equal(again, frame)


def test_predict_from_one_file_and_from_a_list_in_the_given_order(setup, tmp_path):
    clf = Classifier.load(setup["run"])
    one = setup["images"] / "space" / "space_001.jpg"
    frame = clf.predict(str(one), onnx=setup["tiny"], progress=False)
    assert list(frame["path"]) == [str(one)] and frame["error"].isna().all() and "label" not in frame
    given = [str(setup["images"] / "coffee" / "coffee_002.jpg"), str(one), str(setup["images"] / "coffee" /
                                                                               "coffee_002.jpg")]
    listed = clf.predict(given, onnx=setup["tiny"], progress=False)
    assert list(listed["path"]) == given  # order and repeats kept
    assert listed["predicted"].iloc[1] == frame["predicted"].iloc[0]
    # a CSV file list: paths as in the list
    (tmp_path / "list.csv").write_text("path\n" + "\n".join(
        os.path.relpath(p, tmp_path) for p in sorted(setup["images"].glob("cat/*.jpg"))) + "\n")
    from_list = clf.predict(tmp_path / "list.csv", onnx=setup["tiny"], progress=False)
    assert len(from_list) == 8 and from_list["path"].iloc[0].endswith("cat_000.jpg")
    assert not from_list["path"].iloc[0].startswith("/")


def test_bad_images_become_rows_with_an_error(setup, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.jpg").write_bytes((setup["images"] / "cat" / "cat_000.jpg").read_bytes())
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    frame = Classifier.load(setup["run"]).predict(folder, onnx=setup["tiny"], progress=False)
    rows = frame.set_index("path")
    bad, good = rows.loc[os.path.join(str(folder), "broken.jpg")], rows.loc[os.path.join(str(folder), "good.jpg")]
    assert pd.isna(bad["predicted"]) and pd.isna(bad["unknown"]) and "not an image" in bad["error"]
    assert not pd.isna(good["predicted"]) and pd.isna(good["error"])
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        Classifier.load(setup["run"]).predict(tmp_path / "nope.jpg", onnx=setup["tiny"])


def test_evaluate_on_labelled_images_and_on_shards(setup):
    clf = Classifier.load(setup["run"])
    on_images = clf.evaluate(setup["images"], onnx=setup["tiny"], progress=False)
    on_shards = clf.evaluate(setup["shards"], progress=False)
    assert on_images.metrics["n"] == on_shards.metrics["n"] == 24
    assert on_images.metrics["accuracy"] == on_shards.metrics["accuracy"]


def test_user_onnx_with_its_own_preprocessing_predicts_from_images(setup, tmp_path):
    extract(setup["images"], tmp_path / "f", onnx=setup["tiny"], input_size=32, resize=40, mean=(0.5, 0.5, 0.5),
            std=(0.25, 0.25, 0.25), interpolation="bicubic", progress=False)
    run = train(tmp_path / "f", tmp_path / "run", **FAST).run_dir
    frame = Classifier.load(run).predict(str(setup["images"]), onnx=setup["tiny"], progress=False)
    assert frame["predicted"].notna().all() and len(frame) == 24


def test_user_onnx_run_needs_the_model_file(setup):
    with pytest.raises(ValueError, match="--onnx"):
        Classifier.load(setup["run"]).predict(str(setup["images"]), progress=False)


def test_cli_predict_images_and_shards(setup, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    one = setup["images"] / "cat" / "cat_003.jpg"
    out = tmp_path / "p.csv"
    r = subprocess.run([sys.executable, "-m", "stage2_classify", "predict", "--images", str(one), "--onnx",
                        str(setup["tiny"]), "--model", str(setup["run"]), "--out", str(out), "--top-k", "2",
                        "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "1 predictions written" in r.stdout
    table = pd.read_csv(out)
    assert list(table.columns) == ["path", "predicted", "probability", "top1_label", "top1_probability",
                                   "top2_label", "top2_probability", "unknown", "ood_score", "error"]
    assert table["path"].tolist() == [str(one)]
    r = subprocess.run([sys.executable, "-m", "stage2_classify", "predict", "--shards", str(setup["shards"]),
                        "--model", str(setup["run"]), "--out", str(tmp_path / "p.parquet")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(pd.read_parquet(tmp_path / "p.parquet")) == 24


def test_open_set_flag_stored_and_flags_far_vectors(tmp_path):
    shards = write_synthetic_shards(tmp_path / "shards", counts=(80, 80, 80), dim=16)
    run = Path(train(shards, tmp_path / "run", **FAST).run_dir)
    assert (run / "ood.npz").is_file()  # fitted at training time, part of the atomic run
    clf = Classifier.load(run)
    assert clf.ood.info["calibrated_on"] == "validation" and clf.ood.info["quantile"] == 0.95
    inside = clf.predict(shards)
    assert inside["unknown"].mean() < 0.15
    far = np.random.default_rng(1).normal(0, 40, size=(20, 16)).astype(np.float32)
    flagged = clf.predict(far)
    assert flagged["unknown"].all() and (flagged["ood_score"] > clf.ood.threshold).all()
    # a run from before ood.npz existed: fitted from its training shards on first use, the same detector
    before = clf.ood
    (run / "ood.npz").unlink()
    again = Classifier.load(run)
    assert again.ood.info["fitted_after_training_from"] == str(shards) and (run / "ood.npz").is_file()
    np.testing.assert_allclose(again.ood.threshold, before.threshold, rtol=1e-5)
    # retraining into the same directory is allowed (ood.npz is a run file)
    train(shards, run, **FAST)
    assert (run / "ood.npz").is_file()


def test_open_set_flag_unavailable_without_training_shards_says_why(tmp_path):
    import shutil

    shards = write_synthetic_shards(tmp_path / "shards", dim=16)
    run = Path(train(shards, tmp_path / "run", **FAST).run_dir)
    (run / "ood.npz").unlink()  # as a run trained before the flag existed
    moved = tmp_path / "moved"
    shutil.move(shards, moved)
    clf = Classifier.load(run)
    frame = clf.predict(moved, progress=False)
    assert frame["unknown"].isna().all() and frame["predicted"].notna().all()
    assert "unavailable" in clf.ood_note and "calibrate_ood" in clf.ood_note
    clf.calibrate_ood(moved)
    assert Classifier.load(run).predict(moved)["unknown"].notna().all()


def _without_backend(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["PYTHONPATH"] = str(REPO)
    env["KERAS_HOME"] = str(tmp_path)  # no keras.json choosing a backend: Keras' own default is TensorFlow
    return env


def test_import_keras_first_without_a_backend_does_not_crash(tmp_path):
    """A notebook that runs ``import keras`` before ``import stage2_classify``, with no KERAS_BACKEND set.

    The start-up hook (hybrid_transfer_keras.pth, installed next to the packages) picks torch because TensorFlow
    is not installed. Processed here with ``site.addsitedir`` exactly as Python does at start-up, so the test also
    holds in an environment installed before the hook existed."""
    hook_dir = tmp_path / "site"
    hook_dir.mkdir()
    (hook_dir / "hybrid_transfer_keras.pth").write_text((REPO / "hybrid_transfer_keras.pth").read_text())
    code = (f"import site; site.addsitedir({str(hook_dir)!r})\n"
            "import keras\nimport stage2_classify\nprint('backend', keras.backend.backend())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_without_backend(tmp_path),
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "backend torch" in r.stdout


def test_an_explicit_keras_choice_is_left_alone(tmp_path):
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "numpy"}))
    code = "import _hybrid_transfer_keras, os; print(os.environ.get('KERAS_BACKEND'))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_without_backend(tmp_path),
                       timeout=120)
    assert r.stdout.strip() == "None", r.stderr


def test_a_failed_import_keras_then_stage2_gives_the_fix(tmp_path):
    code = ("try:\n    import keras\nexcept ImportError as exc:\n    print('keras failed:', exc)\n"
            "import stage2_classify")
    env = {**_without_backend(tmp_path), "HYBRID_TRANSFER_KERAS_HOOK": "0"}  # as where the start-up hook is absent
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "keras failed: No module named 'tensorflow'" in r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("stage2_classify.BackendError") and "KERAS_BACKEND" in last and "Restart" in last


def test_keras_on_another_backend_gives_a_clear_message(tmp_path):
    # No second Keras backend is installed here (TensorFlow and JAX are not dependencies), so the check runs on
    # the choice itself: KERAS_BACKEND naming another backend is refused before Keras is imported with it.
    env = {**os.environ, "PYTHONPATH": str(REPO), "KERAS_BACKEND": "jax"}
    r = subprocess.run([sys.executable, "-c", "import stage2_classify\nstage2_classify.check_backend()"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("stage2_classify.BackendError") and "KERAS_BACKEND is 'jax'" in last
    assert "Set KERAS_BACKEND=torch" in last


def test_export_cli_writes_one_verified_file(setup, tmp_path):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    r = subprocess.run([sys.executable, "-m", "stage2_classify", "export", "--model", str(setup["run"]), "--out",
                        str(out), "--images", str(setup["images"])], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "verified (CPUExecutionProvider) against the two-stage path on 24 real images" in r.stdout
    model = onnx.load(out)
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["labels"]) == ["cat", "coffee", "space"]
    assert json.loads(props["preprocessing"])["input_size"] == 32 and model.ir_version <= 10
    assert [o.name for o in model.graph.output] == ["probabilities", "ood_score"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    probs, scores = session.run(None, {"images": np.zeros((2, 32, 32, 3), np.uint8)})
    assert probs.shape == (2, 3) and scores.shape == (2,)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
