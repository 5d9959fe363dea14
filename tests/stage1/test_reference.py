"""Stage 1's output against a straightforward reference implementation, so speed work cannot change it unseen.

The reference is what a careful person would write without any of stage 1's machinery: PIL open, EXIF
transpose, RGB, resize the shorter side (rounded) then centre crop (``reference_preprocess``), normalise
with numpy, and the torch model in eager mode, one image at a time in listing order. Stage 1 instead
decodes in worker processes into shared-memory slots, resamples only the pixels that survive the crop
(PIL's ``box``), normalises inside the ONNX graph and runs ONNX Runtime in batches, in completion order.

Two comparisons, because one of those shortcuts is not bit-exact:

* everything after decoding (workers, shared memory, batching and padding, export, in-graph normalisation,
  ONNX Runtime, shard writing and row order) must equal the reference model on the same pixels within
  1e-4 relative / 1e-3 absolute;
* against the textbook pixels, the box resize differs by a level or two on a few pixels. With Pillow ≥ 13
  it is worse for portrait images: Pillow orders its two resampling passes differently for a box
  than for the whole image, and rounding between the passes moves about a fifth of the pixels by up to
  ~6 levels, so the features differ by ~2 % of their norm (cosine ≥ 0.9998). Those bounds are checked
  here, and the exact textbook equality is an expected failure (strict), so a decoder that becomes exact
  is noticed.
"""

import numpy as np
import pytest
from PIL import Image

import shardformat
from stage1_extract import extract, get_backbone
from stage1_extract.model.weights import build_feature_model, weights_source
from stage1_extract.decoding.image import decode_image, reference_preprocess
from tests.support.helpers import make_image_tree, photo

BACKBONE = "efficientnet_lite0"
PORTRAIT = {"space/rocket_portrait.png", "coffee/coffee_exif.jpg"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref") / "images"
    # larger and smaller than the model's 256-pixel resize (down- and upscaling), landscape and portrait
    make_image_tree(root, per_class=2, size=360)
    make_image_tree(root, per_class=1, size=200, classes=("coffee",))  # replaces coffee_000 with a small one
    photo("rocket").transpose(Image.Transpose.ROTATE_90).save(root / "space" / "rocket_portrait.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed portrait (rotate 90° on display)
    photo("coffee").save(root / "coffee" / "coffee_exif.jpg", quality=92, exif=exif)
    return root


@pytest.fixture(scope="module")
def extracted(tree, tmp_path_factory):
    """The project's features, run two ways: one worker and one big batch; two workers, batches of 3."""
    runs = {}
    for workers, batch_size in [(1, 32), (2, 3)]:
        out = tmp_path_factory.mktemp(f"out-{workers}-{batch_size}")
        summary = extract(tree, out, backbone=BACKBONE, provider="cpu", workers=workers, batch_size=batch_size,
                          progress=False)
        assert summary.errors == 0 and summary.extracted == 8
        fs = shardformat.read_features(out)
        order = np.argsort(fs.paths)
        runs[(workers, batch_size)] = (list(fs.paths[order]), fs.features[order])
    return runs


@pytest.fixture(scope="module")
def torch_model():
    spec = get_backbone(BACKBONE)
    return build_feature_model(spec, weights_source(spec).load_state_dict()).float().eval()


def reference_features(model, pixels: list[np.ndarray]) -> np.ndarray:
    """numpy normalisation and the torch model in eager mode, one image at a time."""
    import torch

    prep = get_backbone(BACKBONE).preprocessing
    mean, std = np.asarray(prep.mean, np.float32), np.asarray(prep.std, np.float32)
    out = []
    with torch.no_grad():
        for px in pixels:
            x = (px.astype(np.float32) - mean) / std
            out.append(model(torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()).numpy()[0])
    return np.stack(out)


def textbook_pixels(tree, paths):
    prep = get_backbone(BACKBONE).preprocessing
    return [reference_preprocess(str(tree / p), prep) for p in paths]


@pytest.mark.parametrize("run", [(1, 32), (2, 3)], ids=["1worker-bs32", "2workers-bs3"])
def test_everything_after_decoding_equals_the_reference(tree, extracted, torch_model, run):
    paths, got = extracted[run]
    prep = get_backbone(BACKBONE).preprocessing
    pixels = [decode_image((tree / p).read_bytes(), prep) for p in paths]
    ref = reference_features(torch_model, pixels)
    assert got.shape == ref.shape == (8, get_backbone(BACKBONE).feature_dim)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)
    # each row is its own image's features (no mix-up of rows between batches, slots or workers)
    dist = ((got[:, None, :] - ref[None, :, :]) ** 2).sum(-1)
    assert (dist.argmin(axis=1) == np.arange(len(got))).all()


def test_runs_with_different_workers_and_batches_agree(extracted):
    (p1, f1), (p2, f2) = extracted[(1, 32)], extracted[(2, 3)]
    assert p1 == p2
    np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-5)


def test_close_to_the_textbook_pipeline(tree, extracted, torch_model):
    paths, got = extracted[(1, 32)]
    ref = reference_features(torch_model, textbook_pixels(tree, paths))
    for p, a, b in zip(paths, got, ref):
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        if p in PORTRAIT:  # Pillow's pass order (see the module docstring)
            assert rel < 0.05 and cos > 0.999, (p, rel, cos)
        else:
            assert rel < 5e-3 and cos > 0.99999, (p, rel, cos)
    dist = ((got[:, None, :] - ref[None, :, :]) ** 2).sum(-1)
    assert (dist.argmin(axis=1) == np.arange(len(got))).all()


@pytest.mark.xfail(strict=True, reason="decode_image resamples only the crop box, which is not bit-exact with "
                   "resize-then-crop (rounding; and Pillow's pass order for portrait images)")
def test_equals_the_textbook_pipeline_exactly(tree, extracted, torch_model):
    paths, got = extracted[(1, 32)]
    ref = reference_features(torch_model, textbook_pixels(tree, paths))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)
