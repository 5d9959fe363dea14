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

ROOT = Path(__file__).resolve().parents[1]


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
