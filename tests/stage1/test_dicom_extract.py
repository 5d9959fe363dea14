"""Stage 1 on a folder of DICOM files: extraction, errors, patient groups, frames, and privacy of every output byte."""

from __future__ import annotations

import logging
import os
import stat
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest

pydicom = pytest.importorskip("pydicom")

import shardformat  # noqa: E402
from shardformat.layout import errors_path, meta_dir  # noqa: E402
from stage1_extract import extract  # noqa: E402
from stage1_extract.inputs.dicom_records import SALT_ENV, group_id, group_salt, salt_file  # noqa: E402
from tests.support.helpers import make_dicom_tree, make_tiny_onnx  # noqa: E402

SALT = "test-salt-0123456789abcdef"
TINY = dict(input_size=32, progress=False)


@pytest.fixture()
def tiny(tmp_path):
    return make_tiny_onnx(tmp_path / "tiny.onnx")


@pytest.fixture(autouse=True)
def salt(monkeypatch, tmp_path):
    monkeypatch.setenv(SALT_ENV, SALT)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # never the real user's secret


def errors(out) -> dict[str, str]:
    return {e["path"]: e["reason"] for e in pq.read_table(errors_path(out)).to_pylist()}


def test_extract_a_dicom_folder_with_groups_and_readable_errors(tmp_path, tiny, caplog, capfd, recwarn):
    caplog.set_level(logging.DEBUG)
    root = tmp_path / "images"
    secrets = make_dicom_tree(root)
    caplog.clear(), capfd.readouterr()  # writing the invalid date made pydicom warn here, in the test itself
    out = tmp_path / "out"
    summary = extract(root, out, onnx=tiny, **TINY)
    assert (summary.listed, summary.extracted, summary.errors) == (7, 4, 3)
    fs = shardformat.read_features(out)
    groups = dict(zip(fs.paths, fs.groups))
    key = SALT.encode()
    assert groups == {
        "ct/1.2.826.0.1.3680043.2.1125.1": group_id(secrets["A"], key), "ct/ct_small.dcm": group_id(secrets["A"], key),
        "mr/mr_rle.dcm": group_id(secrets["B"], key), "mr/mr_small.dcm": group_id(secrets["B"], key),
    }
    assert dict(zip(fs.paths, fs.labels))["ct/ct_small.dcm"] == "ct"
    by_path = dict(zip(fs.paths, fs.features))
    assert np.allclose(by_path["mr/mr_rle.dcm"], by_path["mr/mr_small.dcm"])  # lossless: the same pixels
    assert errors(out) == {
        "mr/mr_truncated.dcm": "DICOM pixel data is truncated: 8130 bytes where 1 frame(s) of 64×64 at 16 bits "
                               "need 8192",
        "mr/report.dcm": "DICOM file has no pixel data: a Comprehensive SR Storage (modality SR), not an image",
        "mr/rtstruct.dcm": "DICOM file has no pixel data: a RT Structure Set Storage (modality RTSTRUCT), not an image",
    }
    again = extract(root, out, onnx=tiny, **TINY)
    assert (again.extracted, again.already_done, again.errors_known) == (0, 4, 3)

    # No identifying value anywhere: shards, errors table, run summary, logs, console (workers' stderr too)
    captured = capfd.readouterr()
    text = caplog.text + captured.out + captured.err + "".join(str(w.message) for w in recwarn)
    for value in [*secrets.values(), "SECRETPID"]:  # the prefix also marks the study UIDs
        assert value not in text
        for dirpath, _, names in [*os.walk(out), *os.walk(meta_dir(out))]:
            for name in names:
                with open(os.path.join(dirpath, name), "rb") as fh:
                    assert value.encode() not in fh.read(), (name, value)


def test_study_groups_and_no_groups(tmp_path, tiny):
    root = tmp_path / "images"
    make_dicom_tree(root)
    out = tmp_path / "study"
    extract(root, out, onnx=tiny, dicom_group="study", **TINY)
    fs = shardformat.read_features(out)
    with warnings.catch_warnings():  # the test tree's UIDs are deliberately invalid
        warnings.simplefilter("ignore")
        uid = pydicom.dcmread(root / "ct" / "ct_small.dcm").StudyInstanceUID
    assert dict(zip(fs.paths, fs.groups))["ct/ct_small.dcm"] == group_id(str(uid), SALT.encode(), "study")
    out = tmp_path / "none"
    extract(root, out, onnx=tiny, dicom_group="none", **TINY)
    assert set(shardformat.read_features(out).groups) == {None}


def test_groups_are_stable_across_backbones_and_need_the_secret(tmp_path, monkeypatch):
    root = tmp_path / "images"
    make_dicom_tree(root)
    runs = []
    for seed in (0, 1):  # two different "backbones": same groups
        out = tmp_path / f"out{seed}"
        extract(root, out, onnx=make_tiny_onnx(tmp_path / f"m{seed}.onnx", seed=seed), **TINY)
        fs = shardformat.read_features(out)
        runs.append(dict(zip(fs.paths, fs.groups)))
    assert runs[0] == runs[1]
    monkeypatch.setenv(SALT_ENV, "another-secret-0123456789")
    out = tmp_path / "other"
    extract(root, out, onnx=make_tiny_onnx(tmp_path / "m0.onnx"), **TINY)
    other = dict(zip(*(lambda f: (f.paths, f.groups))(shardformat.read_features(out))))
    assert set(other.values()).isdisjoint(runs[0].values())


def test_per_user_salt_file_is_created_once_and_private(tmp_path, monkeypatch):
    monkeypatch.delenv(SALT_ENV)
    first = group_salt()
    path = salt_file()
    assert path.is_relative_to(tmp_path / "config")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert group_salt() == first and len(first) == 64
    monkeypatch.setenv(SALT_ENV, "short")
    with pytest.raises(ValueError, match="at least 16"):
        group_salt()


def test_one_row_per_frame_and_incremental_plan(tmp_path, tiny):
    root = tmp_path / "frames"
    root.mkdir()
    two = pydicom.dcmread(pydicom.data.get_testdata_file("SC_rgb_rle_2frame.dcm", download=False))
    two.save_as(root / "two.dcm")
    dose = pydicom.dcmread(pydicom.data.get_testdata_file("rtdose.dcm", download=False))
    assert dose.NumberOfFrames == 15
    dose.PixelData = dose.PixelData[:-400]  # the last frames are cut off
    dose.save_as(root / "dose_cut.dcm")
    out = tmp_path / "out"
    s = extract(root, out, onnx=tiny, dicom_frames="all", **TINY)
    assert (s.listed, s.extracted, s.errors) == (17, 2, 15)
    fs = shardformat.read_features(out)
    assert sorted(fs.paths) == ["two.dcm#frame=1", "two.dcm#frame=2"]
    assert not np.allclose(fs.features[0], fs.features[1])  # different frames, different features
    errs = errors(out)
    assert sorted(errs) == sorted(f"dose_cut.dcm#frame={k}" for k in range(1, 16))
    assert all(r.startswith("DICOM pixel data is truncated") for r in errs.values())
    again = extract(root, out, onnx=tiny, dicom_frames="all", **TINY)
    assert (again.extracted, again.already_done, again.errors_known) == (0, 2, 15)
    # Back to the first frame only: the frame rows are dropped, the file's row is made
    first = extract(root, out, onnx=tiny, **TINY)
    assert (first.extracted, first.removed_rows) == (1, 2)
    assert list(shardformat.read_features(out).paths) == ["two.dcm"]
    assert list(errors(out)) == ["dose_cut.dcm"]


def test_gpu_decoder_code_passes_dicom_to_the_cpu_path(tmp_path, tiny):
    root = tmp_path / "images"
    make_dicom_tree(root)
    pydicom.dcmread(pydicom.data.get_testdata_file("SC_rgb_rle_2frame.dcm", download=False)).save_as(
        root / "mr" / "two.dcm")
    cpu, torch_cpu = tmp_path / "cpu", tmp_path / "torch"
    extract(root, cpu, onnx=tiny, dicom_frames="all", **TINY)
    extract(root, torch_cpu, onnx=tiny, decode="torch-cpu", dicom_frames="all", **TINY)
    a, b = shardformat.read_features(cpu), shardformat.read_features(torch_cpu)
    assert list(a.paths) == list(b.paths) and len(a.paths) == 6 and "mr/two.dcm#frame=2" in a.paths
    assert np.allclose(a.features, b.features, atol=1e-5)
    assert errors(cpu) == errors(torch_cpu)


def test_file_list_rows_may_name_single_frames_and_the_cli_options(tmp_path, tiny, capsys):
    from stage1_extract.cli import main

    root = tmp_path / "cine"
    root.mkdir()
    two = pydicom.dcmread(pydicom.data.get_testdata_file("SC_rgb_rle_2frame.dcm", download=False))
    two.PatientID = "SECRETPID-C"
    two.save_as(root / "two.dcm")
    (root / "list.csv").write_text("path,label\ntwo.dcm#frame=2,late\ntwo.dcm#frame=3,missing\n")
    out = tmp_path / "out"
    assert main(["--images", str(root / "list.csv"), "--out", str(out), "--onnx", str(tiny), "--input-size", "32",
                 "--no-progress", "--dicom-group", "study", "--dicom-frames", "all"]) == 0
    fs = shardformat.read_features(out)
    assert list(fs.paths) == ["two.dcm#frame=2"] and list(fs.labels) == ["late"]
    assert fs.groups[0] == group_id(str(two.StudyInstanceUID), SALT.encode(), "study")
    assert errors(out) == {"two.dcm#frame=3": "DICOM frame 3 asked for; the file has 2"}
    assert "SECRETPID" not in capsys.readouterr().out


def test_load_pixels_decodes_the_frame_a_row_names(tmp_path, tiny):
    """``scan.dcm#frame=2`` rows (``dicom_frames="all"``) through the deploy loader: the frame stage 1 extracted,
    not the first one (before: every frame row decoded frame 1, silently)."""
    from stage1_extract import load_pixels
    from stage1_extract.model.preprocessing import Preprocessing

    root = tmp_path / "frames"
    root.mkdir()
    pydicom.dcmread(pydicom.data.get_testdata_file("SC_rgb_rle_2frame.dcm", download=False)).save_as(root / "two.dcm")
    prep = Preprocessing(input_size=32, resize=37)
    got = load_pixels([str(root / "two.dcm#frame=1"), str(root / "two.dcm#frame=2")], prep)
    assert not got.errors and got.array.shape == (2, 32, 32, 3)
    assert not np.array_equal(got.array[0], got.array[1])
    assert np.array_equal(got.array[0], load_pixels([str(root / "two.dcm")], prep).array[0])
