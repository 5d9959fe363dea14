"""Heatmaps: Classifier.explain, the explain CLI, export --heatmap, and agreement with autograd Grad-CAM.

Fast tests run on a tiny random conv net (a user ONNX model: its output is its feature map) over real
photos; the planted-shortcut check runs EfficientNet-Lite0 on real digits (tests/support/planted.py).
"""

from pathlib import Path

import numpy as np
import pytest

from stage1_extract import Preprocessing, extract, load_pixels
from stage2_classify import Classifier, train
from tests.support.helpers import make_image_tree, make_tiny_onnx
from tests.support.planted import autograd_gradcam, correlations, marked_digits, on_marker, torch_head

FAST = dict(epochs=10, patience=3, batch_size=8, learning_rate=1e-2, progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    images = make_image_tree(root / "images", per_class=6)
    tiny = make_tiny_onnx(root / "tiny.onnx")
    extract(images, root / "features", onnx=tiny, input_size=32, progress=False, workers=1)
    runs = {name: Path(train(root / "features", root / name, head=name, hidden=hidden, **FAST).run_dir)
            for name, hidden in (("linear", ()), ("mlp", (16, 8)))}
    return dict(root=root, images=images, tiny=tiny, runs=runs)


def _tiny_torch(tiny: Path):
    """The tiny ONNX net written again in torch from its weights (an independent forward pass)."""
    import onnx
    import torch
    from onnx import numpy_helper

    w = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in onnx.load(str(tiny)).graph.initializer}
    return lambda x: torch.relu(torch.nn.functional.conv2d(x, w["w"], w["b"], stride=2, padding=1))


def test_explain_rows_coordinates_and_targets(setup):
    from stage2_classify.errors import ExplainError

    clf = Classifier.load(setup["runs"]["mlp"])
    frame = clf.explain(str(setup["images"]), onnx=setup["tiny"])
    assert len(frame) == 18 and frame["error"].isna().all() and set(frame["method"]) == {"Grad-CAM"}
    predicted = clf.predict(str(setup["images"]), onnx=setup["tiny"], progress=False)
    assert list(frame["predicted"]) == list(predicted["predicted"])
    prep = Preprocessing.from_dict(clf.metadata.preprocessing)
    for r in frame.itertuples():
        w, h = r.image_size
        assert r.heatmap.shape == (h, w) and r.crop == pytest.approx(prep.crop_box(w, h))  # small photos: full size
        assert 0 <= r.heatmap.min() and r.heatmap.max() <= 1 and r.crop_heatmap.shape == (32, 32)
        left, top, right, bottom = (int(np.floor(v)) for v in r.crop)
        outside = np.ones((h, w), bool)
        outside[top:bottom + 1, left:right + 1] = False
        assert not r.heatmap[outside].any()  # the model never saw it
        # the grid map is divided by its maximum; bilinear upsampling may peak a little lower (or all zeros)
        assert 0.5 < r.crop_heatmap.max() <= 1 or not r.crop_heatmap.any()
    named = clf.explain(str(setup["images"]), onnx=setup["tiny"], target="space")
    assert set(named["target"]) == {"space"}
    every = clf.predict(str(setup["images"]), onnx=setup["tiny"], progress=False, all_probabilities=True)
    np.testing.assert_allclose(named["target_probability"].to_numpy(float), every["prob_space"].to_numpy(float),
                               rtol=1e-5)
    with pytest.raises(ExplainError, match="not one of this run's classes"):
        clf.explain(str(setup["images"]), onnx=setup["tiny"], target="dog")


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_heatmaps_match_autograd_gradcam_on_the_torch_model(setup, head):
    clf = Classifier.load(setup["runs"][head])
    frame = clf.explain(str(setup["images"]), onnx=setup["tiny"])
    pixels = load_pixels(str(setup["images"]), clf.metadata.preprocessing)
    target = np.asarray([clf.classes.index(c) for c in frame["predicted"]])
    prep = clf.metadata.preprocessing
    ref = autograd_gradcam(_tiny_torch(setup["tiny"]), torch_head(clf.model), pixels.array, prep["mean"],
                           prep["std"], target)
    r = correlations(np.stack(list(frame["crop_heatmap"])), ref)
    assert r.min() >= 0.99, r


def test_export_heatmap_agrees_with_explain_and_the_cli_writes_overlays(setup, tmp_path, capsys):
    import onnxruntime as ort
    from PIL import Image

    from stage2_classify.cli import main

    run = setup["runs"]["mlp"]
    onnx_file = tmp_path / "model.onnx"
    assert main(["export", "--run", str(run), "--out", str(onnx_file), "--onnx", str(setup["tiny"]),
                 "--images", str(setup["images"]), "--heatmap"]) == 0
    assert "heatmap  N×32×32" in capsys.readouterr().out
    clf = Classifier.load(run)
    frame = clf.explain(str(setup["images"]), onnx=setup["tiny"])
    pixels = load_pixels(str(setup["images"]), clf.metadata.preprocessing)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["probabilities", "ood_score", "heatmap"]
    got = session.run(None, {"images": pixels.array})
    np.testing.assert_allclose(got[2], np.stack(list(frame["crop_heatmap"])), atol=1e-4)
    out = tmp_path / "explained"
    assert main(["explain", "--run", str(run), "--images", str(setup["images"]), "--out", str(out)]) == 0
    assert "18 overlays" in capsys.readouterr().out  # no --onnx: the map comes from the cached export
    pngs = sorted((out / "overlays").glob("*.png"))
    assert len(pngs) == 18 and Image.open(pngs[0]).size[0] > 100
    with np.load(out / "heatmaps.npz") as npz:
        assert list(npz["paths"]) == list(frame["path"]) and npz["crop_heatmaps"].shape == (18, 32, 32)
        np.testing.assert_allclose(npz["heatmap_0000"], frame["heatmap"].iloc[0], atol=1e-6)
    assert (out / "explanations.csv").read_text().count("\n") == 19


def test_overlay_captions_are_plain_text_not_mathtext():
    from stage2_classify.reports.overlay import overlay_png

    image = np.zeros((40, 60, 3), np.uint8)
    png = overlay_png(image, np.random.default_rng(0).random((40, 60)), (10, 0, 50, 40),
                      ["predicted $x^{2$ \\frac (0.5)", "a_b^c $$"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_backbones_without_a_plain_feature_map_say_so():
    from stage1_extract.model.export import export_backbone

    with pytest.raises(ValueError, match="no feature map"):
        export_backbone("convnext_tiny", feature_map=True)


def test_report_thumbnails_show_dicom_through_stage1s_window():
    from pydicom.data import get_testdata_file

    from stage2_classify.reports.html import Thumbnails

    thumbs = Thumbnails(None)
    uri = thumbs.uri(get_testdata_file("CT_small.dcm", download=False))
    assert uri is not None and uri.startswith("data:image/jpeg;base64,") and not thumbs.problems()


@pytest.mark.slow  # about 25 s on 2 cores: Lite0's two exports and 68 digits
def test_planted_shortcut_found_by_explain_and_matches_autograd_on_lite0(tmp_path):
    """Real digits, one class marked with a white square: the heatmap peaks on the marker for that class."""
    from stage1_extract.model.registry import get_backbone
    from stage1_extract.model.weights import build_torch_classifier, weights_source

    classes = (0, 1, 3, 8)
    train_tree = marked_digits(tmp_path / "train", classes, per_class=12, marked=3)
    held = marked_digits(tmp_path / "held", classes, per_class=5, marked=3, skip=12)
    extract(train_tree, tmp_path / "features", backbone="efficientnet_lite0", progress=False, workers=1)
    clf = Classifier.load(train(tmp_path / "features", tmp_path / "run", hidden=(), epochs=40, patience=8,
                                progress=False).run_dir)
    frame = clf.explain(str(held))
    labels = np.asarray([Path(p).parent.name for p in frame["path"]])
    hits = np.asarray([on_marker(r.heatmap, *r.image_size, slack=64 / 7) for r in frame.itertuples()])
    assert hits[labels == "3"].mean() >= 0.8 and hits[labels != "3"].mean() <= 0.2, (hits, labels)
    # the reference: autograd Grad-CAM through timm's own forward_features with the same weights
    spec = get_backbone("efficientnet_lite0")
    net = build_torch_classifier(spec, weights_source(spec).load_state_dict()).float()
    pixels = load_pixels(str(held), clf.metadata.preprocessing)
    prep = clf.metadata.preprocessing
    target = np.asarray([clf.classes.index(c) for c in frame["predicted"]])
    ref = autograd_gradcam(net.forward_features, torch_head(clf.model), pixels.array, prep["mean"], prep["std"],
                           target)
    assert correlations(np.stack(list(frame["crop_heatmap"])), ref).min() >= 0.99
    # the exported file's own heatmap output finds it too
    import onnxruntime as ort

    from stage2_classify.inference.explain import image_heatmap

    clf.export(tmp_path / "model.onnx", images=str(held), heatmap=True)
    maps = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        ["heatmap"], {"images": pixels.array})[0]
    box = Preprocessing.from_dict(prep).crop_box(64, 64)
    hits = np.asarray([on_marker(image_heatmap(m, 64, 64, box), 64, 64, slack=64 / 7) for m in maps])
    assert hits[labels == "3"].mean() >= 0.8 and hits[labels != "3"].mean() <= 0.2
    # and the CLI's heatmaps.npz
    from stage2_classify.cli import main

    assert main(["explain", "--run", str(clf.run_dir), "--images", str(held), "--out", str(tmp_path / "cli")]) == 0
    with np.load(tmp_path / "cli" / "heatmaps.npz") as npz:
        cli_labels = np.asarray([Path(p).parent.name for p in npz["paths"]])
        hits = np.asarray([on_marker(npz[f"heatmap_{i:04d}"], 64, 64, slack=64 / 7) for i in range(len(cli_labels))])
    assert hits[cli_labels == "3"].mean() >= 0.8 and hits[cli_labels != "3"].mean() <= 0.2
