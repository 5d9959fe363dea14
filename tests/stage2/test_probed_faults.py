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
