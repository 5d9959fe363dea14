"""The training run's report.html: written from the run directory's files, tolerant of missing ones."""

import json
import shutil
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stage2_classify import train
from stage2_classify.runs.writer import check_replaceable
from stage2_classify.reports.run_report import write_run_report
from tests.support.synthetic import write_synthetic_shards

SECTIONS = {"summary", "metrics", "per-class", "confusion", "calibration", "curves", "misclassified"}


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.data_images, self.other_urls, self.text = set(), 0, [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.ids.add(attrs.get("id"))
        if tag == "img":
            if (attrs.get("src") or "").startswith("data:image/"):
                self.data_images += 1
            else:
                self.other_urls.append(attrs.get("src"))
        if tag in ("link", "script") or (tag == "a" and not (attrs.get("href") or "#").startswith("#")):
            self.other_urls.append(attrs.get("href") or attrs.get("src"))

    def handle_data(self, data):
        self.text.append(data)


def parse(path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    page.text = " ".join(page.text)
    return page


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("run-report")
    shards = write_synthetic_shards(base / "shards", counts=(40, 40, 40), noise=2.5)
    return train(shards, base / "run", epochs=8, patience=3, batch_size=32, learning_rate=1e-2, progress=False).run_dir


def test_report_of_a_trained_run(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    path = write_run_report(run)
    assert path == run / "report.html"
    page = parse(path)
    assert SECTIONS <= page.ids and page.other_urls == []
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"{metrics['test']['accuracy']:.3f}" in page.text
    for cls in metrics["classes"]:
        assert cls in page.text
    assert "95% bootstrap intervals" in page.text and "calibration error (ECE)" in page.text
    assert "test images misclassified" in page.text or "test images are classified correctly" in page.text
    assert page.data_images >= 3  # curves, confusion matrix, reliability diagram
    (run / "predictions.parquet").unlink()  # as in runs trained before it existed
    assert "predictions.parquet is missing" in parse(write_run_report(run)).text
    check_replaceable(run)  # a report beside the run does not stop training from replacing it


def test_missing_files_are_named(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    for name in ("curves.png", "confusion_matrix.png", "history.json", "run.json", "report.html"):
        (run / name).unlink()  # report.html: training wrote one; this test writes it elsewhere
    (run / "config.json").write_text("{not json")
    page = parse(write_run_report(run, tmp_path / "elsewhere.html"))
    assert SECTIONS <= page.ids
    assert "curves.png is missing" in page.text and "confusion_matrix.png is missing" in page.text
    assert "config.json (unreadable" in page.text and "unfinished run" in page.text
    assert not (run / "report.html").exists()
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        write_run_report(tmp_path / "nope")


def test_richer_run_dir_gallery_intervals_and_calibration(run_dir, tmp_path):
    """The files the evaluation work adds (predictions.parquet, ci95, reliability) show up in the report."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    images = tmp_path / "images"
    (images / "class_0").mkdir(parents=True)
    rows = []
    for i in range(4):
        Image.new("RGB", (40, 30), (60 * i, 90, 200)).save(images / "class_0" / f"img_{i}.png")
        rows.append({"path": f"class_0/img_{i}.png", "content_id": f"c{i}", "label": "class_0", "split": "test",
                     "predicted": "class_1" if i < 3 else "class_0", "probability": 0.5 + 0.1 * i})
    rows.append({**rows[0], "path": "class_0/gone.png", "predicted": "class_2", "probability": 0.99})
    frame = pd.DataFrame(rows)
    frame["prob_class_0"] = 0.1
    frame.to_parquet(run / "predictions.parquet")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["test"]["ci95"] = {"accuracy": [0.61, 0.72]}
    metrics["test"]["ece"] = 0.042
    metrics["test"]["reliability"] = [{"low": 0.9, "high": 1.0, "count": 7, "confidence": 0.95, "accuracy": 0.9}]
    (run / "metrics.json").write_text(json.dumps(metrics))
    page = parse(write_run_report(run, images=images))
    assert "[0.610–0.720]" in page.text and "0.042" in page.text and "0.9–1.0" in page.text
    assert "4 of 5 test images misclassified" in page.text
    text = (run / "report.html").read_text()
    order = [text.index(p) for p in ("class_0/gone.png", "class_0/img_2.png", "class_0/img_1.png", "class_0/img_0.png")]
    assert order == sorted(order)  # most confident mistakes first
    assert "class_0/img_3.png" not in text  # classified correctly
    assert page.data_images >= 2 + 3  # plots + the three thumbnails that exist
    assert "file missing" in text and "missing image files: 1 under" in page.text
    assert np.isfinite(metrics["test"]["accuracy"])
