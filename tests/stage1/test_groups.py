"""The shard format's optional ``group`` column end to end, and exactly-once at read time.

Groups come from a file list's ``group`` column or ``--group-regex``; both engines write them; shards written
before the column existed still read (group null); rows repeating a path are read once, newest shard first.
"""

import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import shardformat
from shardformat import ShardMetadata
from stage1_extract import extract
from stage1_extract.inputs.listing import list_images
from tests.support.helpers import make_image_tree, make_tiny_onnx

META = ShardMetadata("b", "w", "0" * 64, {"input_size": 1}, 3)


def write(directory, name, paths, groups=None, value=0.0, content_ids=None):
    n = len(paths)
    return shardformat.write_shard(directory, name, META, paths=paths, labels=["x"] * n,
                                   content_ids=content_ids or [f"c-{p}" for p in paths], file_sizes=[1] * n,
                                   mtimes_ns=[0] * n, features=np.full((n, 3), value, np.float32), groups=groups)


def write_old_shard(directory, name, paths):
    """A shard exactly as version 1 was written before the ``group`` column existed."""
    schema = shardformat.shard_schema(META)
    old = pa.schema([f for f in schema if f.name != "group"], metadata=schema.metadata)
    n = len(paths)
    table = pa.table([pa.array(paths), pa.array(["x"] * n), pa.array([f"c-{p}" for p in paths]),
                      pa.array([1] * n, pa.int64()), pa.array([0] * n, pa.int64()),
                      pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * 3, np.float32)), 3)], schema=old)
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, directory / name)


def test_groups_round_trip_and_old_shards_read_as_null(tmp_path):
    write(tmp_path, "part-a-00000.parquet", ["a", "b", "c"], groups=["p1", None, ""])
    write_old_shard(tmp_path, "part-a-00001.parquet", ["d", "e"])
    fs = shardformat.read_features(tmp_path)
    assert fs.paths.tolist() == ["a", "b", "c", "d", "e"]
    assert fs.groups.tolist() == ["p1", None, None, None, None]  # "" is stored as no group
    index, _ = shardformat.read_index(tmp_path)
    assert index.column("group").to_pylist() == ["p1", None, None, None, None]
    assert pq.read_table(tmp_path / "part-a-00000.parquet").schema.field("group").type == pa.string()


def test_a_group_column_of_the_wrong_type_is_refused(tmp_path):
    write(tmp_path, "part-a-00000.parquet", ["a"])
    table = pq.read_table(tmp_path / "part-a-00000.parquet")
    i = table.column_names.index("group")
    table = table.set_column(i, pa.field("group", pa.int64()), pa.array([7], pa.int64()))
    pq.write_table(table, tmp_path / "part-a-00000.parquet")
    with pytest.raises(shardformat.ShardFormatError, match="column 'group' should be string"):
        shardformat.read_features(tmp_path)


def test_rows_repeating_a_path_are_read_once_keeping_the_newest_shard(tmp_path):
    write(tmp_path, "part-20250101T000000-aaaaaa-00000.parquet", ["a", "b", "c"], value=1.0)
    write(tmp_path, "part-20250102T000000-bbbbbb-00000.parquet", ["b", "d"], value=2.0)
    with pytest.warns(UserWarning, match="1 row\\(s\\) repeat a path.*'b'.*Rerun stage1-extract"):
        fs = shardformat.read_features(tmp_path)
    assert sorted(fs.paths.tolist()) == ["a", "b", "c", "d"] and fs.duplicate_rows_dropped == 1
    by_path = dict(zip(fs.paths, fs.features[:, 0]))
    assert by_path["b"] == 2.0 and by_path["a"] == 1.0
    # the same content under two paths is not a repeated row: both images stay
    other = tmp_path / "copies"
    write(other, "part-a-00000.parquet", ["x", "y"], content_ids=["same", "same"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert len(shardformat.read_features(other)) == 2


def test_file_list_group_column_and_group_regex(tmp_path):
    root = make_image_tree(tmp_path / "imgs", per_class=2)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    groups = [f"patient{i % 3}" for i in range(len(files))]
    pd.DataFrame({"path": files, "label": ["a"] * len(files), "group": groups}).to_csv(root / "list.csv", index=False)
    pd.DataFrame({"path": files, "group": groups}).to_parquet(root / "list.parquet")
    for name in ("list.csv", "list.parquet"):
        got = {r.path: r.group for r in list_images(root / name).records}
        assert got == dict(zip(files, groups))
    listing = list_images(root, group_regex=r"_(\d+)\.jpg$")
    assert {r.path: r.group for r in listing.records} == {f: f[-7:-4] for f in files}
    listing = list_images(root, group_regex=r"^(cat)/")
    assert listing.ungrouped == 4 and {r.group for r in listing.records} == {"cat", None}
    with pytest.raises(ValueError, match="exactly one capture group"):
        list_images(root, group_regex=r"cat")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        list_images(root, group_regex=r"(")
    with pytest.raises(ValueError, match="has a 'group' column"):
        list_images(root / "list.csv", group_regex=r"(\d)")


def test_extract_writes_groups_and_a_changed_group_is_rewritten(tmp_path):
    root = make_image_tree(tmp_path / "imgs", per_class=2)
    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    out = tmp_path / "out"
    extract(root, out, onnx=tiny, input_size=32, progress=False, group_regex=r"_(\d+)\.jpg$")
    fs = shardformat.read_features(out)
    assert dict(zip(fs.paths, fs.groups)) == {p: p[-7:-4] for p in fs.paths}
    files = sorted(fs.paths.tolist())
    pd.DataFrame({"path": files, "label": [p.split("/")[0] for p in files],
                  "group": ["g-" + p for p in files]}).to_csv(root / "list.csv", index=False)
    s = extract(root / "list.csv", out, onnx=tiny, input_size=32, progress=False)
    assert s.extracted == len(files)  # the group is part of a row's identity: new groups, new rows
    fs = shardformat.read_features(out)
    assert len(fs) == len(files) and dict(zip(fs.paths, fs.groups)) == {p: "g-" + p for p in files}


def test_group_regex_on_the_command_line(tmp_path, capsys):
    from stage1_extract.cli import main

    root = make_image_tree(tmp_path / "imgs", per_class=2)
    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    out = tmp_path / "out"
    assert main(["--images", str(root), "--out", str(out), "--onnx", str(tiny), "--input-size", "32",
                 "--group-regex", r"^(cat|space)/", "--no-progress"]) == 0
    assert "2 path(s) did not match --group-regex" in capsys.readouterr().out
    fs = shardformat.read_features(out)
    assert {p.split("/")[0]: g for p, g in zip(fs.paths, fs.groups)} == {"cat": "cat", "space": "space",
                                                                         "coffee": None}
    with pytest.raises(SystemExit):
        main(["--images", str(root), "--out", str(out), "--group-regex", "nogroup"])
    assert "exactly one capture group" in capsys.readouterr().err
