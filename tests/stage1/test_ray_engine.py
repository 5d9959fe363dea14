"""The Ray engine (``--engine ray``) against the local engine, on a local Ray instance started by this module.

Same paths, features (float tolerance), errors and summary counts; incremental reruns and exactly-once after
changes; both engines on one output directory; a ``file://`` output; the CLI; fatal errors from workers.
"""

import json
import os
from pathlib import Path
import re
import shutil
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

import shardformat
from shardformat.layout import errors_path, meta_file
from stage1_extract import StrictModeError, extract
from tests.support.helpers import make_image_tree, make_tiny_onnx

ray = pytest.importorskip("ray", reason="the Ray extra is not installed: pip install hybrid-transfer[ray]")
from stage1_extract import extract_ray  # noqa: E402
from stage1_extract.engines.ray_driver import RayUnavailableError, _ray_error, import_ray  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # Ray Data's own, on its context
TINY = dict(input_size=32, progress=False)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_onnx(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture()
def tree(tmp_path):
    root = make_image_tree(tmp_path / "images", per_class=4)
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "space" / "empty.png").write_bytes(b"")
    (root / "coffee" / "notes.txt").write_text("not an image")
    return root


def features(out) -> dict[str, np.ndarray]:
    fs = shardformat.read_features(out)
    assert len(set(fs.paths)) == len(fs.paths), "a path appears in more than one row"
    return dict(zip(fs.paths, fs.features))


def errors(out) -> list[dict]:
    return pq.read_table(errors_path(out)).to_pylist()


def assert_same_output(a, b):
    fa, fb = features(a), features(b)
    assert sorted(fa) == sorted(fb)
    for path in fa:
        np.testing.assert_allclose(fa[path], fb[path], rtol=1e-5, atol=1e-6, err_msg=path)
    ia, ib = shardformat.read_index(a)[0], shardformat.read_index(b)[0]
    cols = ["path", "label", "content_id", "file_size", "mtime_ns"]
    assert sorted(ia.select(cols).to_pylist(), key=str) == sorted(ib.select(cols).to_pylist(), key=str)
    assert errors(a) == errors(b)


def test_ray_and_local_engines_produce_the_same_shards_and_errors(tree, tiny, tmp_path):
    local = extract(tree, tmp_path / "local", onnx=tiny, shard_size=5, **TINY)
    remote = extract_ray(tree, tmp_path / "ray", onnx=tiny, shard_size=5, **TINY)
    assert_same_output(tmp_path / "local", tmp_path / "ray")
    for key in ("listed", "extracted", "already_done", "errors_new", "errors_known", "removed_rows"):
        assert getattr(remote, key) == getattr(local, key), key
    assert (remote.extracted, remote.errors) == (12, 3) and remote.provider == "cpu"
    assert {e["path"] for e in errors(tmp_path / "ray")} == {"cat/broken.jpg", "space/empty.png", "coffee/notes.txt"}

    shards = shardformat.list_shards(tmp_path / "ray")
    assert remote.shards_written == len(shards) >= 3  # written by the workers, at most shard_size rows each
    assert all(pq.read_metadata(s).num_rows <= 5 for s in shards)
    assert all(re.fullmatch(r"part-\d{8}T\d{6}-[0-9a-f]{6}-[0-9a-f]{16}\.parquet", os.path.basename(s)) for s in shards)
    ml = shardformat.read_metadata(shardformat.list_shards(tmp_path / "local")[0])
    mr = shardformat.read_metadata(shards[0])
    assert mr.compatibility_key() == ml.compatibility_key() and mr.backbone == "onnx:tiny.onnx"
    assert pq.read_schema(shards[0]) == pq.read_schema(shardformat.list_shards(tmp_path / "local")[0])
    summary = json.loads(Path(meta_file(tmp_path / "ray", "run.json")).read_text())
    assert summary["extracted"] == 12 and summary["errors"] == 3 and summary["shards_written"] == len(shards)
    assert "stage 1 done" in remote.format()
    assert set(remote.timings) == set(local.timings)  # the same lifecycle, the same timings
    assert remote.timings["wait_decode"] > 0  # the actors' idle time waiting for decoded blocks


def test_ray_cpu_defaults_match_the_local_engine():
    from stage1_extract.run.lifecycle import default_batch_size
    from stage1_extract.engines.ray_driver import plan_resources

    *_, batch_size, provider = plan_resources(ray, provider="auto", actors=None, threads=None, batch_size=None)
    assert (batch_size, provider) == (default_batch_size(False), "cpu") == (16, "cpu")


def test_reruns_are_incremental_and_exactly_once(tree, tiny, tmp_path):
    out = tmp_path / "out"
    extract_ray(tree, out, onnx=tiny, **TINY)
    first_shards = shardformat.list_shards(out)
    again = extract_ray(tree, out, onnx=tiny, **TINY)
    assert (again.extracted, again.already_done, again.errors_known, again.errors_new) == (0, 12, 3, 0)
    assert shardformat.list_shards(out) == first_shards

    # added, changed and removed images; a bad file fixed
    (tree / "space" / "new.jpg").write_bytes((tree / "cat" / "cat_000.jpg").read_bytes())
    (tree / "coffee" / "coffee_001.jpg").write_bytes((tree / "space" / "space_000.jpg").read_bytes())
    (tree / "cat" / "cat_002.jpg").unlink()
    shutil.copy(tree / "cat" / "cat_001.jpg", tree / "cat" / "broken.jpg")
    s = extract_ray(tree, out, onnx=tiny, **TINY)
    assert (s.extracted, s.already_done, s.removed_rows) == (3, 10, 2)
    new_shards = sorted(set(shardformat.list_shards(out)) - set(first_shards))
    assert new_shards and all(n > max(first_shards) for n in new_shards)  # later runs sort later: newest wins

    # exactly what a fresh local run over the changed tree produces
    extract(tree, tmp_path / "fresh", onnx=tiny, **TINY)
    assert_same_output(out, tmp_path / "fresh")
    assert extract_ray(tree, out, onnx=tiny, **TINY).extracted == 0


def test_engines_take_over_each_others_output(tree, tiny, tmp_path):
    out = tmp_path / "out"
    extract(tree, out, onnx=tiny, **TINY)
    s = extract_ray(tree, out, onnx=tiny, **TINY)
    assert (s.extracted, s.already_done, s.errors_known) == (0, 12, 3)
    (tree / "cat" / "cat_000.jpg").unlink()
    (tree / "space" / "more.jpg").write_bytes((tree / "coffee" / "coffee_000.jpg").read_bytes())
    s = extract_ray(tree, out, onnx=tiny, **TINY)
    assert (s.extracted, s.removed_rows) == (1, 1)
    assert extract(tree, out, onnx=tiny, **TINY).extracted == 0
    assert len(features(out)) == 12


def test_ray_engine_writes_shards_to_a_file_uri(tree, tiny, tmp_path):
    uri = (tmp_path / "uri-out").as_uri()
    s = extract_ray(tree, uri, onnx=tiny, shard_size=4, workers=1, actors=1, threads=1, **TINY)
    assert s.extracted == 12 and s.out == uri
    extract(tree, tmp_path / "local", onnx=tiny, **TINY)
    fu = shardformat.read_features(uri)
    assert len(fu) == 12 and all(f.startswith(str(tmp_path / "uri-out")) for f in fu.shard_files)
    assert_same_output(tmp_path / "uri-out", tmp_path / "local")
    assert extract_ray(tree, uri, onnx=tiny, **TINY).extracted == 0


def test_cli_engine_ray(tree, tiny, tmp_path, capsys):
    from stage1_extract.cli import main

    out = tmp_path / "out"
    argv = ["--images", str(tree), "--out", str(out), "--onnx", str(tiny), "--input-size", "32",
            "--engine", "ray", "--no-progress", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["extracted"], summary["errors"]) == (12, 3)
    assert main(argv[:-1]) == 0
    assert "already done 12" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--images", str(tree), "--out", str(out), "--ray-address", "auto"])  # only with --engine ray


def test_strict_stops_at_the_first_bad_image(tmp_path, tiny):
    tree = make_image_tree(tmp_path / "images", per_class=2)
    (tree / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 nope")
    with pytest.raises(StrictModeError, match="cat/broken.jpg"):
        extract_ray(tree, tmp_path / "out", onnx=tiny, strict=True, **TINY)
    assert [e["path"] for e in errors(tmp_path / "out")] == ["cat/broken.jpg"]


def _nan_onnx(path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Sqrt", ["n"], ["s"]),  # sqrt(-x): NaN for x > 0
         helper.make_node("Add", ["s", "s"], ["y"])],
        "nan", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 32, 32])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_non_finite_features_stop_the_run_like_the_local_engine(tree, tmp_path):
    model = _nan_onnx(tmp_path / "nan.onnx")
    with pytest.raises(FloatingPointError, match="non-finite features"):
        extract(tree, tmp_path / "local", onnx=model, mean=(0, 0, 0), std=(1, 1, 1), **TINY)
    with pytest.raises(FloatingPointError, match="non-finite features"):
        extract_ray(tree, tmp_path / "ray", onnx=model, mean=(0, 0, 0), std=(1, 1, 1), **TINY)
    assert shardformat.list_shards(tmp_path / "ray") == []
    assert {e["path"] for e in errors(tmp_path / "ray")} == {e["path"] for e in errors(tmp_path / "local")}


def test_a_clear_error_without_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RayUnavailableError, match=re.escape("pip install hybrid-transfer[ray]")):
        import_ray()


def test_default_backbone_features_agree(tmp_path):
    tree = make_image_tree(tmp_path / "images", per_class=2)
    extract(tree, tmp_path / "local", progress=False)
    s = extract_ray(tree, tmp_path / "ray", progress=False, batch_size=4)
    assert s.extracted == 6 and s.backbone == "efficientnet_lite0"
    fl, fr = features(tmp_path / "local"), features(tmp_path / "ray")
    assert sorted(fl) == sorted(fr)
    for path in fl:  # different batch compositions: equal up to float rounding
        np.testing.assert_allclose(fr[path], fl[path], rtol=1e-4, atol=1e-4, err_msg=path)


def test_worker_failures_surface_as_the_original_error_type():
    text = (
        "ray::MapWorker(MapBatches(InferenceActor)).submit() (pid=1, ip=10.0.0.1)\n"
        '  File "/x/ray_engine.py", line 3, in __call__\n    raise OSError("disk gone")\n'
        "OSError: [Errno 5] disk gone\n\nThe above exception was the direct cause of the following exception:\n\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block.\n"
    )
    err = _ray_error(Exception(text))
    assert type(err) is OSError and "disk gone" in str(err)
    err = _ray_error(Exception("onnxruntime.capi.Fail: bad model\n\nThe above exception was the direct cause"))
    assert isinstance(err, RuntimeError) and "onnxruntime.capi.Fail: bad model" in str(err)


def test_pipeline_run_with_the_ray_engine(tree, tiny, tmp_path):
    import pipeline

    result = pipeline.run(tree, tmp_path / "work", onnx=tiny, input_size=32, engine="ray", progress=False,
                          train_options=dict(epochs=2, batch_size=8))
    assert result.extraction["extracted"] == 12 and result.extraction["errors"] == 3
    assert len(features(result.features_dir)) == 12
    again = pipeline.run(tree, tmp_path / "work", onnx=tiny, input_size=32, engine="ray", progress=False,
                         train_options=dict(epochs=1, batch_size=8), run_name="again")
    assert again.extraction["extracted"] == 0 and again.extraction["already_done"] == 12


def test_ray_engine_writes_groups_like_the_local_engine(tree, tiny, tmp_path):
    a, b = str(tmp_path / "local"), str(tmp_path / "ray")
    extract(tree, a, onnx=tiny, group_regex=r"_(\d+)\.", **TINY)
    extract_ray(tree, b, onnx=tiny, group_regex=r"_(\d+)\.", **TINY)
    ga = dict(zip(*(lambda fs: (fs.paths, fs.groups))(shardformat.read_features(a))))
    gb = dict(zip(*(lambda fs: (fs.paths, fs.groups))(shardformat.read_features(b))))
    assert ga == gb and ga["cat/cat_003.jpg"] == "003"


def test_dicom_folder_same_as_local_engine(tmp_path, tiny, monkeypatch):
    pytest.importorskip("pydicom")
    from tests.support.helpers import make_dicom_tree

    monkeypatch.setenv("HYBRID_TRANSFER_GROUP_SALT", "ray-test-salt-0123456789")
    root = tmp_path / "dicom"
    make_dicom_tree(root)
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    extract(root, local, onnx=tiny, **TINY)
    extract_ray(root, on_ray, onnx=tiny, **TINY)
    a, b = shardformat.read_features(local), shardformat.read_features(on_ray)
    assert list(a.paths) == list(b.paths) and len(a.paths) == 4
    assert list(a.groups) == list(b.groups) and None not in set(a.groups)
    assert np.allclose(a.features, b.features, atol=1e-5)
    assert {e["path"]: e["reason"] for e in errors(local)} == {e["path"]: e["reason"] for e in errors(on_ray)}
