"""Both HTML reports rendered by a real browser (headless Chromium): they draw something, and the DOM the
browser built holds every expected section, with thumbnails found through the root stage 1 recorded.

Skips where no Chromium is installed (``.ci/run`` installs it).
"""

import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stage1_extract import extract
from stage2_classify import train
from stage2_classify.doctor import doctor
from stage2_classify.reports.run_report import write_run_report
from tests.support.helpers import make_dicom_tree, make_image_tree, make_tiny_onnx

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium on this machine (apt-get install chromium)")


def _chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}",
                           *args], capture_output=True, text=True, timeout=180)


class _Dom(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.thumbnails, self.svg, self.overlays = set(), 0, 0, 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.add(attrs.get("id"))
        if tag == "img" and (attrs.get("src") or "").startswith("data:image/jpeg"):
            self.thumbnails += 1
            self.overlays += attrs.get("class") == "overlay"  # a heatmap laid over the image
        if tag == "svg":
            self.svg += 1


def render(report, tmp_path) -> _Dom:
    """Screenshot (must not be blank) and the DOM after rendering, parsed."""
    shot = tmp_path / f"{report.stem}.png"
    done = _chromium(tmp_path, "--window-size=1280,2400", f"--screenshot={shot}", report.as_uri())
    assert shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 50  # text, cards and images drawn, not a blank page
    dom = _chromium(tmp_path, "--dump-dom", report.as_uri())
    assert dom.returncode == 0 and "<section" in dom.stdout, dom.stderr[-2000:]
    parser = _Dom()
    parser.feed(dom.stdout)
    return parser


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """Real photos (scikit-image) extracted with a tiny ONNX model; a trained run on them."""
    base = tmp_path_factory.mktemp("browser")
    images = make_image_tree(base / "images", per_class=10)
    shutil.copyfile(images / "cat" / "cat_000.jpg", images / "space" / "copied_cat.jpg")  # a conflicting copy
    tiny = make_tiny_onnx(base / "tiny.onnx")
    extract(images, base / "feats", onnx=tiny, input_size=32, batch_size=8, workers=1, progress=False)
    run = train(base / "feats", base / "run", epochs=5, batch_size=8, learning_rate=1e-2, progress=False).run_dir
    return base, images, run


def test_doctor_report_renders_in_chromium(real_run, tmp_path):
    import shardformat

    base, images, _ = real_run
    fs = shardformat.read_features(base / "feats")
    classes = sorted(set(fs.labels))
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(len(classes)), size=len(fs))
    oof = pd.DataFrame({"path": fs.paths, **{f"prob_{c}": probs[:, i] for i, c in enumerate(classes)}})
    result = doctor(base / "feats", tmp_path / "doctor", oof=oof)  # no --images: the root from _run.json
    assert result.summary["counts"]["exact_conflicting_groups"] == 1
    dom = render(result.report, tmp_path)
    assert {"summary", "label-issues", "duplicates", "outliers", "map", "method"} <= dom.sections
    assert dom.thumbnails >= 2 and dom.svg >= 1  # the copied pair at least, and the map


def test_run_report_renders_in_chromium(real_run, tmp_path):
    base, images, run = real_run
    report = write_run_report(run, tmp_path / "report.html")
    dom = render(report, tmp_path)
    assert {"summary", "metrics", "per-class", "confusion", "calibration", "curves", "misclassified"} <= dom.sections


def _random_oof(features):
    import shardformat

    fs = shardformat.read_features(features)
    classes = sorted(set(fs.labels))
    probs = np.random.default_rng(0).dirichlet(np.ones(len(classes)) * 0.3, size=len(fs))
    return pd.DataFrame({"path": fs.paths, **{f"prob_{c}": probs[:, i] for i, c in enumerate(classes)}})


def test_galleries_show_heatmap_overlays_in_chromium(real_run, tmp_path):
    """The doctor with --run, and a run report with mistakes: their tiles are heatmap overlays."""
    base, images, run = real_run
    result = doctor(base / "feats", tmp_path / "doctor", oof=_random_oof(base / "feats"), run=run)
    assert len(result.label_issues) > 0
    dom = render(result.report, tmp_path)
    assert dom.overlays >= min(len(result.label_issues), 60)
    faked = tmp_path / "run"  # a copy whose test predictions are all wrong, so its gallery has tiles
    shutil.copytree(run, faked)
    frame = pd.read_parquet(faked / "predictions.parquet")
    classes = sorted(set(frame["label"]))
    frame["predicted"] = [classes[(classes.index(c) + 1) % len(classes)] for c in frame["label"]]
    frame.to_parquet(faked / "predictions.parquet")
    dom = render(write_run_report(faked, tmp_path / "report.html"), tmp_path)
    assert dom.overlays == int((frame["split"] == "test").sum())


def test_dicom_thumbnails_are_shown_in_chromium(tmp_path):
    """DICOM files get thumbnails from the pixels stage 1 decodes (its window), not "no preview"."""
    images = tmp_path / "dicom"
    make_dicom_tree(images)
    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    extract(images, tmp_path / "feats", onnx=tiny, input_size=32, batch_size=8, workers=1, progress=False)
    result = doctor(tmp_path / "feats", tmp_path / "doctor", oof=_random_oof(tmp_path / "feats"))
    text = result.report.read_text()
    assert "could not be previewed" not in text and "no preview" not in text
    dom = render(result.report, tmp_path)
    assert dom.thumbnails >= 1
