"""Rough edges found by using the project as a new user would, and by fault probes (issue 15).

Each test pins one behaviour that used to go silently wrong or gave a confusing message.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import shardformat


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ---- atomic files ---------------------------------------------------------------------------------------------

def test_atomic_text_write_on_full_disk_keeps_old_file_names_it_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "sweep.csv"
    shardformat.atomic_write_text(target, "old\n")
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(OSError) as info:
        shardformat.atomic_write_text(target, "new\n")
    assert "No space left on device" in str(info.value) and str(target) in str(info.value)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.csv"]


def test_read_json_is_defensive_only_when_asked(tmp_path):
    empty = tmp_path / "speed.json"
    empty.write_text("")
    assert shardformat.read_json(empty, default={}) == {}
    assert shardformat.read_json(tmp_path / "missing.json", default=None) is None
    with pytest.raises(ValueError, match="speed.json"):
        shardformat.read_json(empty)
    shardformat.atomic_write_json(empty, {"a": 1})
    assert shardformat.read_json(empty) == {"a": 1}


def test_sweep_on_full_disk_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    from stage2_classify import sweep
    from tests.support.synthetic import write_synthetic_shards

    shards = write_synthetic_shards(tmp_path / "shards", counts=(20, 20), dim=8)
    out = tmp_path / "sweep"
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(OSError) as info:
        sweep(shards, out, hidden=[()], epochs=1, progress=False)
    assert "No space left on device" in str(info.value) and str(out) in str(info.value)  # names the file
    assert list(out.iterdir()) == []


def test_training_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    import pathlib

    from stage2_classify import train
    from tests.support.synthetic import write_synthetic_shards

    shards = write_synthetic_shards(tmp_path / "shards", counts=(20, 20), dim=8)
    real = pathlib.Path.write_text

    def full_disk(self, text, *args, **kwargs):
        if self.name == "metrics.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    with pytest.raises(OSError) as info:
        train(shards, tmp_path / "run", epochs=1, progress=False)
    assert "No space left on device" in str(info.value) and str(tmp_path / "run" / "metrics.json") in str(info.value)
    assert not (tmp_path / "run").exists()


def test_pipeline_run_survives_an_empty_speed_file(tmp_path, monkeypatch):
    from pipeline import orchestrator

    from shardformat.layout import meta_file

    fdir = tmp_path / "features"
    fdir.mkdir()
    (fdir / "_extraction_speed.json").write_text("")  # left by a disk-full error of an older version
    speed = Path(meta_file(fdir, "extraction_speed.json"))
    speed.parent.mkdir()
    speed.write_text("")  # and by this one, had it not written atomically

    class Summary:
        def format(self):
            return "done"

        def as_dict(self):
            return {"extracted": 0, "images_per_second": 0.0, "provider": "cpu"}

    import stage1_extract

    monkeypatch.setattr(stage1_extract, "extract", lambda *a, **k: Summary())
    info = orchestrator._extract(tmp_path / "imgs", str(fdir), progress=False)
    assert info["images_per_second"] == 0.0
    monkeypatch.setattr(stage1_extract, "extract",
                        lambda *a, **k: type("S", (Summary,), {"as_dict": lambda self: {
                            "extracted": 5, "images_per_second": 12.5, "provider": "cpu"}})())
    orchestrator._extract(tmp_path / "imgs", str(fdir), progress=False)
    assert shardformat.read_json(speed)["images_per_second"] == 12.5 and list(fdir.iterdir()) == []
    monkeypatch.setattr(stage1_extract, "extract", lambda *a, **k: Summary())
    assert orchestrator._extract(tmp_path / "imgs", str(fdir), progress=False)["images_per_second"] == 12.5


# ---- the shard folder holds shards only -----------------------------------------------------------------------

@pytest.fixture()
def tiny(tmp_path_factory):
    from tests.support.helpers import make_tiny_onnx

    return make_tiny_onnx(tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def _extract(images, out, tiny, **kw):
    from stage1_extract import extract

    return extract(images, out, onnx=tiny, input_size=32, progress=False, **kw)


def test_everyday_globs_read_exactly_the_feature_rows(tmp_path, tiny):
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.parquet as pq

    from shardformat.layout import errors_path
    from tests.support.helpers import make_image_tree

    images = make_image_tree(tmp_path / "imgs", per_class=3)
    (images / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    out = tmp_path / "out"
    s = _extract(images, out, tiny, shard_size=4)
    assert (s.extracted, s.errors) == (9, 1)
    assert duckdb.sql(f"select count(*) from read_parquet('{out}/*.parquet')").fetchall()[0][0] == 9
    assert pl.read_parquet(f"{out}/*.parquet").height == 9
    assert pl.read_parquet(out).height == 9
    assert pd.read_parquet(out).shape[0] == 9 and pq.read_table(out).num_rows == 9
    assert [e["path"] for e in pq.read_table(errors_path(out)).to_pylist()] == ["cat/broken.jpg"]
    assert errors_path(out) in s.format()


def test_errors_table_of_an_older_version_is_read_and_moved_out_of_the_shard_folder(tmp_path, tiny):
    import pyarrow.parquet as pq

    from shardformat.layout import errors_path
    from tests.support.helpers import make_image_tree

    images = make_image_tree(tmp_path / "imgs", per_class=2)
    (images / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    out = tmp_path / "out"
    _extract(images, out, tiny)
    # lay the folder out as an older version did: errors table, summary and lock among the shards
    os.replace(errors_path(out), out / "_errors.parquet")
    (out / "_run.json").write_text("{}")
    (out / "_lock").write_text("12345\n")
    s = _extract(images, out, tiny)
    assert (s.extracted, s.errors_known, s.errors_new) == (0, 1, 0)  # the old table was read: a known error
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("part-")) == []
    assert [e["path"] for e in pq.read_table(errors_path(out)).to_pylist()] == ["cat/broken.jpg"]


# ---- listing: links, hidden folders, formats by content -----------------------------------------------------

def test_a_link_to_a_sibling_class_never_takes_its_images(tmp_path, tiny):
    from stage1_extract.inputs.listing import list_images
    from tests.support.helpers import make_image_tree

    images = make_image_tree(tmp_path / "imgs", per_class=2)
    os.symlink("../coffee", images / "cat" / "more")  # sorts before coffee: used to relabel coffee as cat
    os.symlink("cat", images / "kitty")  # a class folder that is a link to another class
    outside = make_image_tree(tmp_path / "elsewhere", per_class=1, classes=("space",)) / "space"
    os.symlink(outside, images / "cat" / "external")  # outside the input: followed
    listing = list_images(images)
    labels = {r.path: r.label for r in listing.records}
    assert sorted(p for p, lab in labels.items() if lab == "coffee") == ["coffee/coffee_000.jpg",
                                                                          "coffee/coffee_001.jpg"]
    assert "cat/external/space_000.jpg" in labels and not any(p.startswith(("cat/more", "kitty")) for p in labels)
    reasons = dict(listing.problems)
    assert "coffee" in reasons["cat/more"] and "loop" not in reasons["cat/more"]
    assert "cat" in reasons["kitty"] and "loop" not in reasons["kitty"]
    assert listing.empty_classes == []
    s = _extract(images, tmp_path / "out", tiny)
    assert s.empty_classes == [] and s.extracted == 7
    fs = shardformat.read_features(tmp_path / "out")
    assert {p: lab for p, lab in zip(fs.paths, fs.labels)}["coffee/coffee_000.jpg"] == "coffee"


def test_a_real_link_loop_is_still_called_one(tmp_path):
    from stage1_extract.inputs.listing import list_images
    from tests.support.helpers import make_image_tree

    images = make_image_tree(tmp_path / "imgs", per_class=1)
    os.symlink("..", images / "cat" / "up")
    reasons = dict(list_images(images).problems)
    assert "symbolic link loop" in reasons["cat/up"]


def test_a_hidden_class_folder_is_reported_not_silently_dropped(tmp_path, tiny):
    from tests.support.helpers import make_image_tree

    images = make_image_tree(tmp_path / "imgs", per_class=1, classes=("cat", "coffee"))
    (images / ".space").mkdir()
    import shutil

    shutil.copy(images / "cat" / "cat_000.jpg", images / ".space" / "x.jpg")
    s = _extract(images, tmp_path / "out", tiny)
    assert s.hidden_folders == [".space"] and s.extracted == 2
    assert "hidden folders (ignored" in s.format() and ".space" in s.format()


def test_images_are_recognised_by_content_not_only_by_extension(tmp_path, tiny):
    from PIL import Image, features

    from stage1_extract.inputs.listing import list_images
    from tests.support.helpers import photo

    cls = tmp_path / "imgs" / "cat"
    cls.mkdir(parents=True)
    img = photo("chelsea").resize((40, 30))
    img.save(cls / "a.qoi")
    img.save(cls / "no_extension", "PNG")
    img.save(cls / "photo.dat", "JPEG")
    expected = {"cat/a.qoi", "cat/no_extension", "cat/photo.dat"}
    if features.check("avif"):
        img.save(cls / "b.avif")
        expected.add("cat/b.avif")
    (cls / "notes.txt").write_text("hello")
    (cls / "data.bin").write_bytes(os.urandom(64))
    listing = list_images(tmp_path / "imgs")
    assert {r.path for r in listing.records} == expected
    reasons = dict(listing.problems)
    assert "not an image type" in reasons["cat/notes.txt"] and "cat/data.bin" in reasons
    s = _extract(tmp_path / "imgs", tmp_path / "out", tiny)
    assert (s.extracted, s.errors) == (len(expected), 2)


# ---- a rerun repairs rows with non-finite vectors ------------------------------------------------------------

def test_a_rerun_re_extracts_rows_with_nan_features(tmp_path, tiny):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.support.helpers import make_image_tree

    images = make_image_tree(tmp_path / "imgs", per_class=2)
    out = tmp_path / "out"
    _extract(images, out, tiny)
    good = shardformat.read_features(out)
    shard = shardformat.list_shards(out)[0]
    table = pq.read_table(shard)
    feats = np.stack(table.column("feature").to_numpy(zero_copy_only=False)).astype(np.float32)
    feats[1, 3] = np.nan  # a damaged row, as a bit flip or an older version could leave
    column = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), type=table.schema.field("feature").type)
    damaged = table.set_column(table.schema.get_field_index("feature"), table.schema.field("feature"), column)
    pq.write_table(damaged, shard)
    with pytest.raises(shardformat.ShardFormatError, match="rerun stage1-extract"):
        shardformat.read_features(out)
    s = _extract(images, out, tiny)
    assert (s.extracted, s.already_done, s.removed_rows) == (1, 5, 1)
    repaired = shardformat.read_features(out)
    order = np.argsort(repaired.paths)
    np.testing.assert_allclose(repaired.features[order], good.features[np.argsort(good.paths)], rtol=1e-5)


# ---- interrupts and crashes lose at most about a minute ------------------------------------------------------

def test_ctrl_c_keeps_the_rows_already_computed_and_says_how_many(tmp_path, tiny, monkeypatch):
    from stage1_extract.runtime import session as session_module
    from stage1_extract.run.writer import Interrupted
    from tests.support.helpers import make_image_tree

    images = make_image_tree(tmp_path / "imgs", per_class=4)
    real_run, calls = session_module.FeatureSession.run, []

    def run_then_interrupt(self, batch, n=None):
        calls.append(n)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_run(self, batch, n)

    monkeypatch.setattr(session_module.FeatureSession, "run", run_then_interrupt)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt) as info:
        _extract(images, out, tiny, batch_size=2, workers=1)  # shard size 2048: nothing was due yet
    assert isinstance(info.value, Interrupted) and info.value.saved == 4
    assert "4 image(s) extracted by this run are saved" in str(info.value)
    assert len(shardformat.read_features(out)) == 4
    monkeypatch.undo()
    s = _extract(images, out, tiny)
    assert (s.already_done, s.extracted) == (4, 8)


def test_shards_are_also_written_by_time(tmp_path, monkeypatch):
    import numpy as np

    import stage1_extract.run.writer as writer_module
    from tests.support.synthetic import synthetic_metadata

    clock = [1000.0]
    monkeypatch.setattr(writer_module.time, "monotonic", lambda: clock[0])
    writer = writer_module.ShardWriter(str(tmp_path / "out"), synthetic_metadata(4), shard_size=2048)
    assert writer.max_seconds <= 60
    row = dict(paths=["a.png"], labels=["x"], content_ids=["1-a"], file_sizes=[1], mtimes_ns=[0])
    writer.add(**row, features=np.zeros((1, 4), np.float32))
    clock[0] += 61  # a slow run: a minute later the buffered rows go to disk, without waiting for 2,048
    writer.add(**{**row, "paths": ["b.png"]}, features=np.ones((1, 4), np.float32))
    import time

    deadline = time.time() + 30
    while not shardformat.list_shards(tmp_path / "out") and time.time() < deadline:  # written in the background
        time.sleep(0.02)
    assert len(shardformat.read_features(tmp_path / "out")) == 2, "nothing reached the disk before close()"
    writer.close()
    assert writer.written_rows == 2


# ---- messages -------------------------------------------------------------------------------------------------

def _stage1_cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "stage1_extract", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_an_out_that_is_a_file_gets_one_clear_message(tmp_path, tiny, capsys):
    from pipeline.cli import main as pipeline_main
    from stage1_extract.cli import main as stage1_main
    from tests.support.helpers import make_image_tree

    images = make_image_tree(tmp_path / "imgs", per_class=1)
    taken = tmp_path / "err"
    taken.write_text("a file")
    assert stage1_main(["--images", str(images), "--out", str(taken), "--onnx", str(tiny), "--input-size", "32",
                        "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"--out {taken}: is a file, not a folder" in err and "Errno" not in err, err
    assert pipeline_main(["run", "--images", str(images), "--workdir", str(taken)]) == 1
    err = capsys.readouterr().err
    assert f"--workdir {taken}: is a file" in err and "Errno" not in err, err
    for out in (f"{taken}/", str(taken / "preds.csv"), str(tmp_path)):
        assert pipeline_main(["predict", "--images", str(images), "--model", str(tmp_path / "no-run"),
                              "--out", out]) == 1
        err = capsys.readouterr().err
        assert f"--out {out}:" in err and "Errno" not in err and ".tmp-" not in err, err
    with pytest.raises(OSError, match="names a folder; give a file name"):
        shardformat.atomic_write_via_path(tmp_path, lambda tmp: None)


def test_stage1_and_pipeline_on_an_empty_folder_fail_clearly(tmp_path, tiny, capsys):
    from pipeline.cli import main as pipeline_main
    from stage1_extract.cli import main as stage1_main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert stage1_main(["--images", str(empty), "--out", str(tmp_path / "out"), "--onnx", str(tiny),
                        "--input-size", "32", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"--images {empty}: no images found" in err, err
    assert pipeline_main(["run", "--images", str(empty), "--workdir", str(tmp_path / "work"), "--onnx",
                          str(tiny), "--input-size", "32"]) == 1
    err = capsys.readouterr().err
    assert f"--images {empty}: no images found" in err and "stage1-extract --out" not in err, err
    (empty / "notes.txt").write_text("hello")
    assert stage1_main(["--images", str(empty), "--out", str(tmp_path / "out"), "--onnx", str(tiny),
                        "--input-size", "32", "--no-progress"]) == 1
    assert "1 file(s) skipped, e.g. notes.txt" in capsys.readouterr().err


def test_degenerate_training_sets_get_a_clear_message(tmp_path, capsys):
    from stage2_classify.cli import main
    from stage2_classify.data.dataset import DatasetError, load_dataset
    from tests.support.synthetic import write_synthetic_shards

    few = write_synthetic_shards(tmp_path / "few", counts=(2, 3), shards=1)  # --images at one class folder
    with pytest.raises(DatasetError, match="too little data") as info:
        load_dataset(few)
    assert "class_0: 2, class_1: 3" in str(info.value) and "one sub-folder per class" in str(info.value)
    assert main(["train", "--shards", str(few), "--out", str(tmp_path / "run"), "--quiet"]) == 1
    assert "too little data" in capsys.readouterr().err and not (tmp_path / "run").exists()
    lopsided = write_synthetic_shards(tmp_path / "lopsided", counts=(40, 2), shards=1)
    with pytest.raises(DatasetError, match="two classes with 3 rows or more"):
        load_dataset(lopsided)
    load_dataset(write_synthetic_shards(tmp_path / "ok", counts=(3, 3), shards=1))  # small but usable
    one = write_synthetic_shards(tmp_path / "one", counts=(20,), shards=1)
    with pytest.raises(DatasetError) as info:
        load_dataset(one)
    assert "('class_0')" in str(info.value) and "np.str_" not in str(info.value)


def test_a_pickle_named_model_keras_is_called_what_it_is(tmp_path):
    import pickle

    from stage2_classify.runs.layout import REQUIRED
    from stage2_classify.runs.load import RunDirError, check_run

    run = tmp_path / "run"
    run.mkdir()
    for name in REQUIRED:
        (run / name).write_text("{}")
    (run / "model.keras").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(RunDirError, match="not a Keras model file"):
        check_run(run)


def test_provider_cuda_without_a_gpu_prints_only_our_message(tmp_path, tiny):
    from stage1_extract.runtime.session import _gpu_visible
    from tests.support.helpers import make_image_tree

    if _gpu_visible():
        pytest.skip("a GPU is visible: --provider cuda works here")
    images = make_image_tree(tmp_path / "imgs", per_class=1)
    r = _stage1_cli("--images", images, "--out", tmp_path / "out", "--onnx", tiny, "--input-size", 32,
                    "--provider", "cuda", "--no-progress")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stage1-extract: error: --provider cuda"), r.stderr
    assert "\x1b[" not in r.stderr


def test_no_progress_bar_in_a_redirected_log(tmp_path, tiny):
    from tests.support.helpers import make_image_tree

    images = make_image_tree(tmp_path / "imgs", per_class=2)
    r = _stage1_cli("--images", images, "--out", tmp_path / "out", "--onnx", tiny, "--input-size", 32)
    assert r.returncode == 0, r.stderr
    assert "extracting" not in r.stderr and "\r" not in r.stderr, r.stderr


def test_every_pipeline_option_has_help_text():
    import argparse

    from pipeline.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {'/'.join(action.option_strings)}"
               for name, sub in subparsers.choices.items() for action in sub._actions
               if action.option_strings and not action.help and "--no-progress" not in action.option_strings]
    assert missing == []
