"""Tests for the data scripts: the Animal-MNIST demo preparer (restricted unpickling, idempotent reruns)
and the MedMNIST .npz converter. Both are plain scripts, imported here from their file paths."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    path = ROOT / "data" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_data_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


prep = _load("prepare_animal_mnist")
med = _load("medmnist_to_folders")


def _tree(out: Path) -> dict[str, list[str]]:
    return {d.name: sorted(p.name for p in d.iterdir()) for d in sorted(out.iterdir()) if d.is_dir()}


def _stats(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")}


# ---------------------------------------------------------------------------------------------------
# Animal-MNIST
# ---------------------------------------------------------------------------------------------------

def test_animal_prepare_small_then_rerun_is_noop(tmp_path, capsys):
    out = tmp_path / "animals"
    assert prep.main(["--out", str(out), "--per-class", "3", "--no-progress"]) == 0
    assert "wrote 30 PNG" in capsys.readouterr().out

    tree = _tree(out)
    assert list(tree) == list(prep.CLASS_NAMES)  # bear, bird, …, zebra
    assert all(len(files) == 3 for files in tree.values())
    source = prep.load_array(prep.find_source_dir() / prep.DATA_FILE)
    labels = prep.load_array(prep.find_source_dir() / prep.LABEL_FILE)
    for cls, files in tree.items():
        for name in files:
            with Image.open(out / cls / name) as im:
                im.load()
                assert im.format == "PNG" and im.mode == "L" and im.size == (28, 28)  # not upscaled
                index = int(name.rsplit("_", 1)[1][:-4])
                assert prep.CLASS_NAMES[labels[index]] == cls
                np.testing.assert_array_equal(np.asarray(im), source[index])
    assert (out / prep.MARKER).is_file()
    assert not [p for p in out.rglob("*.tmp")]

    before = _stats(out)
    assert prep.main(["--out", str(out), "--per-class", "3", "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert _stats(out) == before  # not a single file rewritten


def test_animal_is_deterministic_and_rebuilds_after_changes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    prep.prepare(a, per_class=2, seed=7, progress=False)
    prep.prepare(b, per_class=2, seed=7, progress=False)
    assert _tree(a) == _tree(b)
    assert all((a / c / f).read_bytes() == (b / c / f).read_bytes() for c, fs in _tree(a).items() for f in fs)

    # another seed: same counts, files of the old selection removed
    prep.prepare(a, per_class=2, seed=8, progress=False)
    assert all(len(fs) == 2 for fs in _tree(a).values()) and _tree(a) != _tree(b)

    # an interrupted run (no marker, a leftover temp file) is redone, not trusted
    (b / prep.MARKER).unlink()
    (b / "cat" / ".cat_02003.png.xyz.tmp").write_bytes(b"half")
    summary = prep.prepare(b, per_class=2, seed=7, progress=False)
    assert summary["skipped"] is False
    assert (b / prep.MARKER).is_file() and not list(b.rglob("*.tmp"))
    assert prep.prepare(b, per_class=2, seed=7, progress=False)["skipped"] is True

    # output of an earlier version of the script (visible _prepared.json, .tmp-* files) is replaced
    (b / "_prepared.json").write_text("{}")
    (b / "dog" / ".tmp-dog_04000.png").write_bytes(b"half")
    assert prep.prepare(b, per_class=2, seed=7, progress=False)["skipped"] is False
    assert not (b / "_prepared.json").exists() and not (b / "dog" / ".tmp-dog_04000.png").exists()


def test_animal_refuses_foreign_files_in_out(tmp_path, capsys):
    out = tmp_path / "animals"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert prep.main(["--out", str(out), "--per-class", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "did not write" in err
    assert (out / "notes.txt").read_text() == "mine"


class _Evil:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    flag = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(f"touch {flag}"))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global '(posix|nt|os)\.system'"):
        prep.restricted_loads(payload)
    evil_file = tmp_path / "evil.gz"
    with gzip.open(evil_file, "wb") as f:
        f.write(payload)
    with pytest.raises(pickle.UnpicklingError, match="evil.gz"):
        prep.load_array(evil_file)
    assert not flag.exists()  # nothing ran

    class EvalEvil:
        def __reduce__(self):
            return (eval, ("1+1",))

    class NumpyLoad:  # a NumPy function, but not an array reconstructor
        def __reduce__(self):
            return (np.load, (str(tmp_path / "x.npy"),))

    for obj in (EvalEvil(), NumpyLoad()):
        with pytest.raises(pickle.UnpicklingError, match="only rebuilds"):
            prep.restricted_loads(pickle.dumps(obj))


def test_restricted_unpickler_rebuilds_arrays_only(tmp_path):
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    for protocol in (3, 4, 5):
        got = prep.restricted_loads(pickle.dumps(arr, protocol=protocol))
        np.testing.assert_array_equal(got, arr)
        assert got.dtype == arr.dtype
    obj_file = tmp_path / "obj.pkl"
    obj_file.write_bytes(pickle.dumps(np.array([1, "a"], dtype=object)))
    with pytest.raises(pickle.UnpicklingError, match="object-dtype"):
        prep.load_array(obj_file)


# ---------------------------------------------------------------------------------------------------
# MedMNIST
# ---------------------------------------------------------------------------------------------------

def _fake_medmnist(path: Path, rgb: bool, n_classes: int, sizes=(12, 4, 5), drop=()):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(med.SPLITS, sizes):
        shape = (n, 28, 28, 3) if rgb else (n, 28, 28)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % n_classes).astype(np.uint8).reshape(n, 1)
    for key in drop:
        del arrays[key]
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("rgb", [False, True])
def test_medmnist_to_folders(tmp_path, rgb, capsys):
    npz = tmp_path / ("bloodmnist.npz" if rgb else "mydata.npz")
    arrays = _fake_medmnist(npz, rgb, n_classes=8 if rgb else 3)
    out = tmp_path / "out"
    assert med.main([str(npz), "--out", str(out), "--no-progress"]) == 0
    assert "wrote 21 PNG" in capsys.readouterr().out

    names = list(med.KNOWN_CLASS_NAMES["bloodmnist"]) if rgb else ["class_0", "class_1", "class_2"]
    assert sorted(d.name for d in out.iterdir() if d.is_dir()) == sorted(names)
    with open(out / "split.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "split"]
    assert len(rows) == 21 and [r["split"] for r in rows].count("val") == 4
    for row in rows:
        split, index = row["split"], int(Path(row["path"]).stem.split("_")[1])
        expected_label = names[int(arrays[f"{split}_labels"][index, 0])]
        assert row["label"] == expected_label and Path(row["path"]).parent.name == expected_label
        with Image.open(out / row["path"]) as im:
            assert im.mode == ("RGB" if rgb else "L") and im.size == (28, 28)
            np.testing.assert_array_equal(np.asarray(im), arrays[f"{split}_images"][index])
    assert not list(out.rglob("*.tmp"))


def test_medmnist_subset_of_splits_and_class_names(tmp_path):
    npz = tmp_path / "x.npz"
    _fake_medmnist(npz, rgb=False, n_classes=2)
    s = med.convert(npz, tmp_path / "o", splits=["train"], class_names=["benign", "malignant"], progress=False)
    assert s["counts"] == {"train": {"benign": 6, "malignant": 6}}
    assert sorted(p.name for p in (tmp_path / "o" / "benign").iterdir())[0] == "train_000000.png"


def test_medmnist_errors(tmp_path, capsys):
    npz = tmp_path / "broken.npz"
    _fake_medmnist(npz, rgb=True, n_classes=3, drop=("val_labels",))
    assert med.main([str(npz), "--out", str(tmp_path / "o1"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "broken.npz" in err and "'val_labels'" in err
    assert not (tmp_path / "o1").exists()  # validated before writing anything

    # the other splits still convert
    assert med.main([str(npz), "--out", str(tmp_path / "o2"), "--splits", "train,test", "--no-progress"]) == 0
    capsys.readouterr()

    # label out of range for the given names
    assert med.main([str(npz), "--out", str(tmp_path / "o3"), "--splits", "train",
                     "--class-names", "a,b", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "broken.npz" in err and "train_labels[2] = 2 is out of range" in err

    # a non-empty output folder is not written into without --force
    assert med.main([str(npz), "--out", str(tmp_path / "o2"), "--splits", "train", "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# DICOM folder + labels CSV → file list
# ---------------------------------------------------------------------------------------------------

def test_dicom_to_filelist_rsna_and_tcia_layouts(tmp_path, monkeypatch):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    import pyarrow.parquet as pq

    import shardformat
    from stage1_extract import extract
    from stage1_extract.inputs.dicom_records import group_id
    from tests.support.helpers import make_tiny_onnx

    conv = _load("dicom_to_filelist")
    salt = "filelist-test-salt-0123456789"
    monkeypatch.setenv("HYBRID_TRANSFER_GROUP_SALT", salt)
    # RSNA-like: <patientId>.dcm, labels keyed by file name, several rows per patient (one per box)
    rsna = tmp_path / "rsna" / "train_images"
    rsna.mkdir(parents=True)
    pids = ["pid-aaa111", "pid-bbb222", "pid-ccc333", "pid-ddd444"]
    for pid, name in zip(pids, ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small.dcm"]):
        ds = pydicom.dcmread(get_testdata_file(name, download=False))
        ds.PatientID = pid
        ds.save_as(rsna / f"{pid}.dcm")
    (rsna / "readme.txt").write_text("not dicom")
    labels = tmp_path / "rsna" / "labels.csv"
    labels.write_text("patientId,x,Target\npid-aaa111,1,1\npid-aaa111,5,1\npid-bbb222,,0\n"
                      "pid-ccc333,1,0\npid-ccc333,2,1\n")  # ccc: rows disagree; ddd: no row
    out = tmp_path / "rsna" / "list.csv"
    assert conv.main([str(rsna), str(labels), "--out", str(out), "--key-column", "patientId",
                      "--label-column", "Target"]) == 0
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == [
        {"path": "train_images/pid-aaa111.dcm", "label": "1", "group": group_id("pid-aaa111", salt.encode())},
        {"path": "train_images/pid-bbb222.dcm", "label": "0", "group": group_id("pid-bbb222", salt.encode())},
    ]
    # stage 1 reads it as a file list; the groups in the shards are the list's
    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    s = extract(out, tmp_path / "feats", onnx=tiny, input_size=32, progress=False)
    assert (s.extracted, s.errors) == (2, 0)
    fs = shardformat.read_features(tmp_path / "feats")
    assert dict(zip(fs.paths, fs.groups)) == {r["path"]: r["group"] for r in rows}

    # TCIA-like: <PatientID>/<study>/<series>/1-01.dcm keyed by PatientID; --link-dir hides the identifiers
    tcia = tmp_path / "tcia"
    for pid, label in (("LIDC-X-0001", "nodule"), ("LIDC-X-0002", "clear")):
        series = tcia / pid / "01-01-2000-study" / "1-series"
        series.mkdir(parents=True)
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
        ds.PatientID = pid
        ds.save_as(series / "1-01.dcm")
    clinical = tmp_path / "clinical.csv"
    clinical.write_text("Patient ID,Diagnosis\nLIDC-X-0001,nodule\nLIDC-X-0002,clear\n")
    counts = conv.convert(tcia, clinical, tmp_path / "tcia.parquet", key="PatientID", key_column="Patient ID",
                          label_column="Diagnosis", link_dir=tmp_path / "links")
    assert counts == {"rows": 2}
    listed = pq.read_table(tmp_path / "tcia.parquet").to_pylist()
    assert sorted(r["label"] for r in listed) == ["clear", "nodule"]
    for r in listed:
        assert "LIDC" not in r["path"] and r["path"].startswith("links/" + r["label"] + "/")
        assert os.path.realpath(tmp_path / r["path"]).endswith("1-01.dcm")
    s = extract(tmp_path / "tcia.parquet", tmp_path / "feats2", onnx=tiny, input_size=32, progress=False)
    assert (s.extracted, s.errors) == (2, 0)
    for dirpath, _, names in os.walk(tmp_path / "feats2"):
        for name in names:
            assert b"LIDC-X" not in (Path(dirpath) / name).read_bytes()
