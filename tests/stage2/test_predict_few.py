"""One-image prediction the short way (issue 24, ``stage2_classify/inference/few.py``): the CLI on one image gives
the rows the general path gives, reads the head without Keras, and starts no worker process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stage1_extract import extract
from stage2_classify import Classifier, train
from stage2_classify.inference import few
from tests.support.helpers import make_image_tree, make_tiny_onnx

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)

CLI_IN_PROCESS = """
import sys
from stage2_classify.cli import main
code = main(sys.argv[1:])
print("HEAVY", [m for m in ("keras", "torch") if m in sys.modules])
sys.exit(code)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("few")
    images = make_image_tree(root / "images", per_class=6, size=40)
    tiny = make_tiny_onnx(root / "tiny.onnx")
    extract(images, root / "features", onnx=tiny, input_size=32, progress=False)
    run = train(root / "features", root / "run", epochs=8, patience=3, batch_size=8, learning_rate=1e-2,
                progress=False).run_dir
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg" * 4)
    return dict(root=root, images=images, tiny=tiny, run=Path(run))


def test_the_head_without_keras_gives_kerass_probabilities(setup):
    clf = Classifier.load(setup["run"])
    x = np.random.default_rng(0).normal(size=(20, clf.metadata.feature_dim)).astype(np.float32) * 3
    ours = few.apply_head(few.head_steps(setup["run"] / "model.keras"), x)
    np.testing.assert_allclose(ours, clf.predict_proba(x), atol=1e-5)


def test_few_rows_equal_the_general_paths_rows(setup, tmp_path):
    one = sorted(setup["images"].rglob("*.jpg"))
    given = [str(one[0]), str(setup["root"] / "broken.jpg"), str(one[5]), str(one[0])]
    assert few.wanted(given) and not few.wanted(given, features=tmp_path) and not few.wanted([str(setup["images"])])
    fast = few.predict_few(given, setup["run"], top_k=2, all_probabilities=True, onnx=setup["tiny"],
                           progress=False)
    slow = Classifier.load(setup["run"]).predict(given, top_k=2, all_probabilities=True, onnx=setup["tiny"],
                                                 progress=False, features=tmp_path / "cache")
    assert list(fast.columns) == list(slow.columns)
    pd.testing.assert_frame_equal(fast.drop(columns=[c for c in fast if "prob" in c or c == "ood_score"]),
                                  slow.drop(columns=[c for c in slow if "prob" in c or c == "ood_score"]))
    only_bad = few.predict_few([given[1]], setup["run"], onnx=setup["tiny"], progress=False)
    assert only_bad["predicted"].isna().all() and only_bad["error"].notna().all()
    for column in [c for c in fast if "prob" in c] + ["ood_score"]:
        np.testing.assert_allclose(fast[column].to_numpy(float, na_value=np.nan),
                                   slow[column].to_numpy(float, na_value=np.nan), atol=1e-4, rtol=1e-4)


def test_the_cli_on_one_image_imports_no_keras_and_writes_the_same_row(setup, tmp_path):
    image = str(sorted(setup["images"].rglob("*.jpg"))[3])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = ["predict", "--images", image, "--run", str(setup["run"]), "--onnx", str(setup["tiny"]), "--no-progress"]
    r = subprocess.run([sys.executable, "-c", CLI_IN_PROCESS, *args, "--out", str(tmp_path / "fast.csv")],
                       capture_output=True, text=True, env=env, timeout=200)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout and "1 predictions written" in r.stdout, r.stdout + r.stderr
    fast = pd.read_csv(tmp_path / "fast.csv")
    slow = Classifier.load(setup["run"]).predict(image, onnx=setup["tiny"], progress=False,
                                                 features=tmp_path / "cache")
    assert list(fast.columns) == list(slow.columns) and fast["predicted"].tolist() == slow["predicted"].tolist()
    np.testing.assert_allclose(fast["probability"], slow["probability"].to_numpy(float), atol=1e-4)


def test_a_head_the_short_way_cannot_read_is_left_to_the_general_path(setup, tmp_path):
    import shutil
    import zipfile

    image = str(sorted(setup["images"].rglob("*.jpg"))[0])
    odd = tmp_path / "run"
    shutil.copytree(setup["run"], odd)
    with zipfile.ZipFile(odd / "model.keras", "w") as z:  # a Keras file, but not the head train builds
        z.writestr("config.json", '{"config": {"layers": [{"class_name": "Conv2D", "config": {"name": "c"}}]}}')
        z.writestr("model.weights.h5", b"")
    assert few.predict_few([image], odd, onnx=setup["tiny"], progress=False) is None
