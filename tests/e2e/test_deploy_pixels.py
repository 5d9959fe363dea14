"""Deployment reproduces stage 1 exactly (issue 24): the README's deploy snippet (the exported ONNX file fed by
``stage1_extract.pixels.load_pixels``) gives a 16-bit PNG and a DICOM file the probabilities
``Classifier.predict`` gives them, and the pixel loader imports no torch, Keras or ONNX."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stage1_extract import extract
from stage2_classify import Classifier, train
from tests.support.helpers import make_image_tree, make_tiny_onnx

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "keras", "onnx", "onnxruntime")
pytestmark = pytest.mark.timeout(300)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_the_pixel_loader_imports_no_training_or_inference_stack():
    check = f"import stage1_extract.pixels; import sys; assert not [m for m in {HEAVY!r} if m in sys.modules]"
    r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-c", "import stage1_extract, sys; stage1_extract.load_pixels; "
                        f"assert not [m for m in {HEAVY!r} if m in sys.modules]"],
                       capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 0, r.stderr


def _phantom16(path: Path) -> Path:
    """A 16-bit grayscale phantom whose values fill only 1,000–3,000 of 65,535: wrong without windowing."""
    yy, xx = np.mgrid[0:80, 0:64]
    img = 1000 + 1200 * ((xx - 32) ** 2 + (yy - 40) ** 2 < 400) + 8 * yy
    Image.fromarray(img.astype(np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    return path


@pytest.mark.slow
def test_the_deploy_snippet_matches_classifier_predict_on_16_bit_png_and_dicom(tmp_path):
    from pydicom.data import get_testdata_file

    images = make_image_tree(tmp_path / "images", per_class=6, size=40)
    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    extract(images, tmp_path / "features", onnx=tiny, input_size=32, progress=False)
    run = train(tmp_path / "features", tmp_path / "run", epochs=8, patience=3, batch_size=8, learning_rate=1e-2,
                progress=False).run_dir
    clf = Classifier.load(run)
    clf.export(tmp_path / "place" / "model.onnx", images=images, onnx=tiny)
    place = tmp_path / "place"
    (place / "photo.jpg").write_bytes(next(images.rglob("*.jpg")).read_bytes())
    (place / "scan.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes())
    _phantom16(place / "slide16.png")

    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    snippet = next(b for b in blocks if "load_pixels" in b and "InferenceSession" in b)
    code = snippet + (
        "\nimport sys\nprint('TORCH', [m for m in ('torch', 'keras') if m in sys.modules])\n"
        "print('PROBS', json.dumps({p: v.tolist() for p, v in zip(pixels.paths, probs)}))\n")
    r = subprocess.run([sys.executable, "-"], input=code, cwd=place, capture_output=True, text=True, env=_env(),
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "TORCH []" in r.stdout, r.stdout
    deployed = json.loads(r.stdout.split("PROBS ", 1)[1])
    assert sorted(deployed) == ["photo.jpg", "scan.dcm", "slide16.png"]

    frame = clf.predict([str(place / n) for n in ("photo.jpg", "scan.dcm", "slide16.png")], onnx=tiny,
                        all_probabilities=True, progress=False, features=tmp_path / "cache")
    assert frame["error"].isna().all(), frame["error"].tolist()
    for name, row in zip(("photo.jpg", "scan.dcm", "slide16.png"), frame.itertuples()):
        want = np.asarray([getattr(row, f"prob_{c}") for c in clf.classes], np.float64)
        np.testing.assert_allclose(deployed[name], want, atol=1e-4, err_msg=name)


def test_plain_rgb_conversion_is_not_what_stage1_sees(tmp_path):
    """Why the snippet must use the loader: PIL's own 16-bit → RGB conversion clips the phantom to white."""
    from stage1_extract.pixels import load_pixels

    path = _phantom16(tmp_path / "p16.png")
    prep = {"input_size": 32, "resize": 32, "interpolation": "bilinear", "crop": "center",
            "mean": [0, 0, 0], "std": [1, 1, 1]}
    ours = load_pixels([str(path)], prep)
    assert ours.errors == [] and ours.array.shape == (1, 32, 32, 3)
    naive = np.asarray(Image.open(path).convert("RGB").resize((32, 40)))
    assert ours.array.std() > 20 and naive.std() < 5  # the window keeps the structure; the naive one is flat
    with pytest.raises(Exception, match="crop"):
        load_pixels([str(path)], {**prep, "crop": "random"})
