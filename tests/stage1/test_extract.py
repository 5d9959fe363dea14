"""Stage 1 end to end: shard schema, incremental reruns, errors, strict mode, locking, CLI, kill -9 resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import shardformat
from shardformat.layout import errors_path, meta_file
from stage1_extract import StrictModeError, extract
from stage1_extract.run.lock import OutputLock, OutputLockedError
from tests.support.helpers import make_image_tree, make_tiny_onnx

REPO = Path(__file__).resolve().parents[2]


def rows(out):
    t = pq.read_table(out)
    return dict(zip(t.column("path").to_pylist(), np.asarray(t.column("feature").to_pylist(), np.float32)))


@pytest.fixture()
def tree(tmp_path):
    root = make_image_tree(tmp_path / "images", per_class=3)
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def test_shards_have_the_documented_schema_and_metadata(tree, tmp_path):
    out = tmp_path / "out"
    s = extract(tree, out, progress=False)
    assert (s.extracted, s.already_done, s.errors) == (9, 0, 2)
    table = pq.read_table(out)  # plain pyarrow: errors/lock/summary files are ignored by discovery
    assert table.column_names == ["path", "label", "content_id", "file_size", "mtime_ns", "group", "feature"]
    assert table.schema.field("feature").type.list_size == 1280
    meta = shardformat.read_metadata(shardformat.list_shards(out)[0])
    assert meta.backbone == "efficientnet_lite0" and meta.feature_dim == 1280
    assert meta.preprocessing["mean"] == [127.0, 127.0, 127.0] and meta.preprocessing["std"] == [128.0] * 3
    assert meta.weights_id.startswith("sha256:") and len(meta.onnx_sha256) == 64
    assert "onnxruntime-gpu" in meta.versions or "onnxruntime" in meta.versions
    assert sorted(set(table.column("label").to_pylist())) == ["cat", "coffee", "space"]
    assert all(p.startswith(("cat/", "coffee/", "space/")) for p in table.column("path").to_pylist())
    fs = shardformat.read_features(out)
    assert fs.features.shape == (9, 1280) and fs.features.dtype == np.float32 and np.isfinite(fs.features).all()
    assert len(pd.read_parquet(out)) == 9
    assert duckdb.sql(f"select count(*) from read_parquet('{out}/part-*.parquet')").fetchall()[0][0] == 9
    errors = pq.read_table(errors_path(out)).to_pylist()
    reasons = {e["path"]: e["reason"] for e in errors}
    assert set(reasons) == {"cat/broken.jpg", "cat/notes.txt"}
    assert "cannot decode" in reasons["cat/broken.jpg"] and "extension" in reasons["cat/notes.txt"]
    summary = json.loads(Path(meta_file(out, "run.json")).read_text())
    assert summary["extracted"] == 9 and summary["errors"] == 2


def test_incremental_reruns(tree, tmp_path):
    out = tmp_path / "out"
    extract(tree, out, progress=False)
    before = rows(out)
    again = extract(tree, out, progress=False)
    assert again.extracted == 0 and again.already_done == 9 and again.errors_known == 2

    # touched but identical content: still done (content hash matches)
    f = tree / "coffee" / "coffee_000.jpg"
    os.utime(f, ns=(time.time_ns(), time.time_ns()))
    assert extract(tree, out, progress=False).extracted == 0

    # added, changed and removed images
    (tree / "space" / "new.jpg").write_bytes((tree / "cat" / "cat_000.jpg").read_bytes())
    (tree / "coffee" / "coffee_001.jpg").write_bytes((tree / "space" / "space_000.jpg").read_bytes())
    (tree / "cat" / "cat_002.jpg").unlink()
    s = extract(tree, out, progress=False)
    assert s.extracted == 2 and s.already_done == 7 and s.removed_rows == 2
    after = rows(out)
    paths = pq.read_table(out).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 9
    assert "cat/cat_002.jpg" not in after
    np.testing.assert_allclose(after["space/new.jpg"], before["cat/cat_000.jpg"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after["coffee/coffee_001.jpg"], before["space/space_000.jpg"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(after["space/space_001.jpg"], before["space/space_001.jpg"])


def test_strict_mode_stops_at_the_first_bad_file(tree, tmp_path):
    with pytest.raises(StrictModeError, match="broken.jpg|notes.txt"):
        extract(tree, tmp_path / "out", strict=True, progress=False)


def test_second_run_on_the_same_output_is_refused(tree, tmp_path):
    out = tmp_path / "out"
    with OutputLock(str(out)):
        with pytest.raises(OutputLockedError, match="in use by another"):
            extract(tree, out, progress=False)


def test_other_backbone_into_the_same_output_is_refused(tree, tmp_path):
    out = tmp_path / "out"
    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    extract(tree, out, onnx=tiny, progress=False)
    with pytest.raises(shardformat.IncompatibleShardsError, match="separate --out"):
        extract(tree, out, progress=False)


def test_file_list_input(tree, tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\n" + "".join(
        f"{p.relative_to(tmp_path)},{'a' if i % 2 else 'b'}\n"
        for i, p in enumerate(sorted((tree / "space").glob("*.jpg")))) + "missing.jpg,a\n")
    out = tmp_path / "out"
    s = extract(listing, out, onnx=make_tiny_onnx(tmp_path / "tiny.onnx"), progress=False)
    assert s.extracted == 3 and s.errors == 1
    table = pq.read_table(out)
    assert sorted(table.column("label").to_pylist()) == ["a", "b", "b"]


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "stage1_extract", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, **kw)


def test_cli_end_to_end(tree, tmp_path):
    help_text = run_cli("--help")
    assert help_text.returncode == 0 and "--backbone" in help_text.stdout and "--provider" in help_text.stdout
    out = tmp_path / "out"
    first = run_cli("--images", tree, "--out", out, "--no-progress")
    assert first.returncode == 0, first.stderr
    assert "extracted 9" in first.stdout and "errors 2" in first.stdout
    second = run_cli("--images", tree, "--out", out, "--no-progress")
    assert second.returncode == 0 and "extracted 0" in second.stdout and "already done 9" in second.stdout
    strict = run_cli("--images", tree, "--out", tmp_path / "strict", "--strict", "--no-progress")
    assert strict.returncode != 0 and "--strict" in strict.stderr
    missing = run_cli("--images", tmp_path / "nowhere", "--out", out)
    assert missing.returncode != 0 and "no such file or folder" in missing.stderr


def test_kill_9_then_resume_is_exactly_once(tmp_path):
    tree = make_image_tree(tmp_path / "images", per_class=60, size=48)
    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    ref = tmp_path / "ref"
    extract(tree, ref, onnx=tiny, progress=False)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "stage1_extract", "--images", tree, "--out", out, "--onnx", tiny,
            "--batch-size", "4", "--shard-size", "4", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(list(map(str, args)), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < 1 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    partial = len(pq.read_table(out).column("path")) if list(out.glob("part-*.parquet")) else 0
    assert partial < 180, "the run finished before it could be killed; make it slower"
    s = extract(tree, out, onnx=tiny, progress=False)
    assert s.already_done == partial and s.extracted == 180 - partial
    got, want = rows(out), rows(ref)
    paths = pq.read_table(out).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 180 and set(got) == set(want)
    for p in want:
        np.testing.assert_allclose(got[p], want[p], rtol=1e-5, atol=1e-6)
