"""Faults found by probing stage 2 (issue 24): class names matplotlib would read as mathtext, a plot that fails
after fitting, a missing path in a Python list of images, two predictions waiting on one feature cache."""

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import shardformat
from stage2_classify import Classifier, train
from tests.support.synthetic import synthetic_metadata

FAST = dict(epochs=3, patience=2, batch_size=32, learning_rate=1e-2, progress=False)
ODD_NAMES = ["$\\foo$", "$x$", "plain"]


def _shards_with_labels(directory: Path, names, per_class: int = 30, dim: int = 8) -> Path:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(4 * k, 1, size=(per_class, dim)) for k in range(len(names))]).astype(np.float32)
    labels = [n for n in names for _ in range(per_class)]
    paths = [f"img_{i:04d}.png" for i in range(len(x))]
    shardformat.write_shard(directory, "part-odd-00000.parquet", synthetic_metadata(dim), paths=paths,
                            labels=labels, content_ids=[f"c{i}" for i in range(len(x))],
                            file_sizes=[1] * len(x), mtimes_ns=[0] * len(x), features=x)
    return directory


def test_class_names_that_look_like_mathtext_are_plotted_as_written(tmp_path):
    from stage2_classify.reports.plots import plot_confusion

    plot_confusion(np.eye(3, dtype=int), ODD_NAMES, str(tmp_path / "cm.png"))
    assert (tmp_path / "cm.png").stat().st_size > 0  # before: ParseFatalException: Unknown symbol: \foo

    result = train(_shards_with_labels(tmp_path / "shards", ODD_NAMES), tmp_path / "run", **FAST)
    run = Path(result.run_dir)
    assert sorted(result.classes) == sorted(ODD_NAMES)
    assert (run / "model.keras").is_file() and (run / "confusion_matrix.png").is_file()


def test_a_plot_that_fails_costs_the_picture_not_the_trained_run(tmp_path, monkeypatch, caplog):
    import stage2_classify.reports.plots as plots

    def broken(*args, **kwargs):
        raise RuntimeError("no usable font")

    monkeypatch.setattr(plots, "_figure", broken)
    with caplog.at_level(logging.WARNING):
        result = train(_shards_with_labels(tmp_path / "shards", ["a", "b"]), tmp_path / "run", **FAST)
    run = Path(result.run_dir)
    assert (run / "model.keras").is_file() and (run / "metrics.json").is_file()
    assert not (run / "confusion_matrix.png").exists()
    assert "could not draw confusion_matrix.png" in caplog.text and "no usable font" in caplog.text
    assert "confusion_matrix.png is missing" in (run / "report.html").read_text()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from stage1_extract import extract
    from tests.support.helpers import make_image_tree, make_tiny_onnx

    root = tmp_path_factory.mktemp("probed")
    images = make_image_tree(root / "images", per_class=4, size=48, classes=("cat", "coffee"))
    tiny = make_tiny_onnx(root / "tiny.onnx")
    extract(images, root / "features", onnx=tiny, input_size=32, workers=1, progress=False)
    result = train(root / "features", root / "run", **FAST)
    return dict(root=root, images=images, tiny=tiny, run=Path(result.run_dir))


def test_a_missing_path_in_a_python_list_is_an_error_row_as_on_the_command_line(trained, tmp_path):
    import subprocess
    import sys

    import pandas as pd

    good = str(sorted(trained["images"].rglob("*.jpg"))[0])
    missing = str(tmp_path / "gone.jpg")
    clf = Classifier.load(trained["run"])
    frame = clf.predict([good, missing], onnx=trained["tiny"], features=tmp_path / "api", progress=False)
    # before: FileNotFoundError for the whole call
    assert list(frame["path"]) == [good, missing]
    assert frame["predicted"].notna().tolist() == [True, False]
    assert frame["error"].iloc[1] == "listed file does not exist"
    with pytest.raises(FileNotFoundError, match=r"none of the 1 image file\(s\) exists: .*gone.jpg"):
        clf.predict([missing], onnx=trained["tiny"], features=tmp_path / "api", progress=False)

    listing = tmp_path / "list.csv"
    pd.DataFrame({"path": [good, missing]}).to_csv(listing, index=False)
    out = tmp_path / "cli.csv"
    r = subprocess.run([sys.executable, "-m", "stage2_classify", "predict", "--images", str(listing), "--run",
                        str(trained["run"]), "--onnx", str(trained["tiny"]), "--features", str(tmp_path / "cli"),
                        "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    def rows(table):
        return {p: tuple(None if pd.isna(v) else str(v) for v in table.loc[p, ["predicted", "error"]])
                for p in table.index}

    assert rows(pd.read_csv(out).set_index("path")) == rows(frame.set_index("path"))


def test_a_second_prediction_waits_for_the_first_on_the_shared_cache(trained, tmp_path):
    from stage1_extract.run.lock import OutputLock

    images = [str(p) for p in sorted(trained["images"].rglob("*.jpg"))[:2]]
    cache = tmp_path / "cache"
    first = OutputLock(str(cache)).__enter__()  # another prediction extracting into the same cache
    threading.Timer(1.0, first.__exit__, (None, None, None)).start()
    t0 = time.monotonic()
    frame = Classifier.load(trained["run"]).predict(images, onnx=trained["tiny"], features=cache, progress=False)
    assert time.monotonic() - t0 >= 0.9  # it waited (before: OutputLockedError at once)
    assert frame["predicted"].notna().all()
