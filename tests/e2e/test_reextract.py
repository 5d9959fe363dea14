"""Real images, extracted twice: through the folder and through a shuffled file list with other paths, the
same images give the same split and the same metrics; ``pipeline compare`` tests every backbone on one split."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

import pipeline
from stage1_extract import extract
from stage2_classify import train
from tests.support.helpers import make_image_tree, make_tiny_onnx

FAST = dict(epochs=8, patience=3, batch_size=8, learning_rate=1e-2, hidden=(), progress=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_tree(tmp_path_factory.mktemp("reextract") / "images", per_class=8)


def by_content(run_dir) -> dict:
    table = pd.read_csv(Path(run_dir) / "split.csv")
    return dict(zip(table["content_id"], table["split"]))


def test_folder_and_shuffled_file_list_give_identical_split_and_metrics(images, tmp_path):
    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    extract(images, tmp_path / "a", onnx=tiny, input_size=32, progress=False)
    # the same files copied under other names, listed in a CSV in another order
    copies = tmp_path / "copies"
    copies.mkdir()
    rows = []
    for i, src in enumerate(sorted(images.rglob("*.jpg"), reverse=True)):
        name = f"file_{i:03d}.jpg"
        shutil.copy(src, copies / name)
        rows.append({"path": name, "label": src.parent.name})
    pd.DataFrame(rows).to_csv(copies / "list.csv", index=False)
    extract(copies / "list.csv", tmp_path / "b", onnx=tiny, input_size=32, shard_size=5, progress=False)
    a = train(tmp_path / "a", tmp_path / "run_a", seed=3, **FAST)
    b = train(tmp_path / "b", tmp_path / "run_b", seed=3, **FAST)
    assert by_content(a.run_dir) == by_content(b.run_dir) and len(by_content(a.run_dir)) == 24
    assert a.metrics["test"] == b.metrics["test"] and a.metrics["validation"] == b.metrics["validation"]


def test_compare_trains_and_tests_every_backbone_on_one_split(images, tmp_path):
    one = make_tiny_onnx(tmp_path / "one.onnx", seed=1)
    two = make_tiny_onnx(tmp_path / "two.onnx", seed=2, channels=4)
    rows = pipeline.compare(images, [str(one), str(two)], tmp_path / "cmp",
                            train_options={k: v for k, v in FAST.items() if k != "progress"}, progress=False)
    first, second = (Path(r["run_dir"]) for r in rows)
    assert by_content(first) == by_content(second)
    assert rows[0]["split_file"] == rows[1]["split_file"] == str(first / "split.csv")
    config = json.loads((second / "config.json").read_text())
    assert config["split"]["method"] == "file"
    sizes = [json.loads((Path(r["run_dir"]) / "metrics.json").read_text())["test"]["n"] for r in rows]
    assert sizes[0] == sizes[1] > 0
