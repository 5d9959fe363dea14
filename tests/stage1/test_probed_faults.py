"""Faults and odd inputs found by probing stage 1 (issue 24); each test failed before its fix.

Float TIFFs on the 0..1 scale, a header-only JPEG, file lists whose files are all missing or whose labels say
"missing" the way R and pandas write it, a folder named like an image, one ``--out`` spelled two ways, a no-op
rerun over read-only shards, waiting for another run's lock, bit flips inside a shard, and a user ONNX model
whose weights live in an external-data file.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

import shardformat
from shardformat import ShardFormatError
from stage1_extract import extract
from stage1_extract.decoding.files import DecodeError
from stage1_extract.decoding.image import decode_image
from stage1_extract.inputs.listing import list_images
from stage1_extract.inputs.records import NoImagesError
from stage1_extract.model.preprocessing import Preprocessing
from stage1_extract.run.lock import OutputLock, OutputLockedError
from tests.support.helpers import make_image_tree, make_tiny_onnx
from tests.support.synthetic import write_synthetic_shards

REPO = Path(__file__).resolve().parents[2]
PREP = Preprocessing(32, 37)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_onnx(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


def _extract(images, out, tiny, **kw):
    return extract(images, out, onnx=tiny, input_size=32, workers=1, progress=False, **kw)


def _tiff(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.float32), mode="F").save(buf, format="TIFF")
    return buf.getvalue()


# ---- decoding --------------------------------------------------------------------------------------------------

def test_a_float_tiff_on_the_0_to_1_scale_is_not_read_as_black():
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))
    arr = decode_image(_tiff(ramp), PREP)
    assert 100 < arr.mean() < 155 and arr.max() >= 220, arr.mean()  # before: everything 0 or 1
    half = decode_image(_tiff(ramp * 0.5), PREP)  # a dim image stays dim: 0..1 is a scale, not a window
    assert 50 < half.mean() < 80 and half.max() <= 130, half.mean()
    wide = decode_image(_tiff(ramp * 255), PREP)  # the 0..255 convention is kept as before
    np.testing.assert_allclose(wide.mean(), arr.mean(), atol=2)


def _header_only_jpeg(size: int = 9000) -> tuple[bytes, bytes]:
    """(markers through the scan header then EOI, no entropy-coded data; the same without EOI)."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (120, 30, 30)).save(buf, "JPEG", quality=20)
    data = buf.getvalue()
    sos = data.find(b"\xff\xda")
    header = data[:sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")]
    return header + b"\xff\xd9", header + data[len(header):len(header) + 64]


def test_a_header_only_jpeg_is_a_decode_error_not_a_grey_image(tmp_path, tiny, monkeypatch):
    with_eoi, cut = _header_only_jpeg()
    with pytest.raises(DecodeError, match="no image data"):
        decode_image(with_eoi, PREP)  # before: a uniform grey 128 image, extracted as if real
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # a caller's global setting must not leak in
    with pytest.raises(DecodeError, match="truncated|no image data"):
        decode_image(cut, PREP)
    with pytest.raises(DecodeError, match="no image data"):
        decode_image(with_eoi, PREP)
    monkeypatch.undo()
    root = make_image_tree(tmp_path / "imgs", per_class=1, size=48, classes=("cat",))
    (root / "cat" / "header_only.jpg").write_bytes(with_eoi)
    s = _extract(root, tmp_path / "out", tiny)
    assert (s.extracted, s.errors) == (1, 1)
    errors = shardformat.read_errors(tmp_path / "out")
    assert errors[0]["path"] == "cat/header_only.jpg" and "no image data" in errors[0]["reason"]


# ---- listing ---------------------------------------------------------------------------------------------------

def test_a_file_list_whose_files_are_all_missing_is_an_error(tmp_path, tiny):
    (tmp_path / "list.csv").write_text("path,label\ngone/a.jpg,cat\ngone/b.jpg,dog\n")
    with pytest.raises(NoImagesError, match=r"none of the 2 listed files.*gone/a.jpg: listed file does not exist"):
        list_images(tmp_path / "list.csv")
    r = subprocess.run([sys.executable, "-m", "stage1_extract", "--images", str(tmp_path / "list.csv"),
                        "--out", str(tmp_path / "out"), "--onnx", str(tiny), "--input-size", "32", "--no-progress"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode != 0 and "none of the 2 listed files" in r.stderr, r.stdout + r.stderr


def test_an_empty_folder_named_like_an_image_does_not_make_a_class_tree(tmp_path):
    root = tmp_path / "imgs"
    make_image_tree(tmp_path / "src", per_class=2, size=48, classes=("cat",))
    root.mkdir()
    for f in (tmp_path / "src" / "cat").iterdir():
        f.rename(root / f.name)
    (root / "x.jpg").mkdir()
    listing = list_images(root)  # before: a class tree with one empty class, every image skipped
    assert listing.layout == "flat" and len(listing.records) == 2
    assert any(p == "x.jpg" and "folder" in reason for p, reason in listing.problems)


def test_missing_value_labels_are_unlabelled_and_labels_are_trimmed(tmp_path):
    root = make_image_tree(tmp_path / "imgs", per_class=2, size=48, classes=("cat", "coffee"))
    files = sorted(str(p.relative_to(tmp_path)) for p in root.rglob("*.jpg"))
    (tmp_path / "r.csv").write_text("path,label\n" + "".join(
        f"{f},{lab}\n" for f, lab in zip(files, ["NA", "NaN", " cat ", "cat"])))
    listing = list_images(tmp_path / "r.csv")
    labels = {r.path: r.label for r in listing.records}
    assert [labels[f] for f in files] == [None, None, "cat", "cat"]
    notes = " ".join(listing.notes)
    assert "missing" in notes and "'NA'" in notes and "trimmed" in notes

    pd.DataFrame({"path": files, "label": [np.nan, 1.0, 2.0, np.nan]}).to_parquet(tmp_path / "f.parquet")
    labels = {r.path: r.label for r in list_images(tmp_path / "f.parquet").records}
    assert [labels[f] for f in files] == [None, "1.0", "2.0", None]  # before: a class 'nan'


# ---- the output folder -----------------------------------------------------------------------------------------

def test_two_spellings_of_one_out_share_one_lock_and_one_bookkeeping_folder(tmp_path, tiny):
    real = tmp_path / "features"
    real.mkdir()
    link = tmp_path / "features-link"
    link.symlink_to(real)
    with OutputLock(str(real)):
        with pytest.raises(OutputLockedError):
            with OutputLock(str(link)):  # before: a second lock on features-link.meta/lock, and two runs at once
                pass
    root = make_image_tree(tmp_path / "imgs", per_class=2, size=48, classes=("cat",))
    _extract(root, real, tiny)
    s = _extract(root, link, tiny)
    assert (s.extracted, s.already_done) == (0, 2)
    assert not (tmp_path / "features-link.meta").exists()
    assert shardformat.layout.errors_path(link) == shardformat.layout.errors_path(real)  # readers find it too
    assert len(shardformat.read_features(real)) == 2


def test_waiting_for_another_runs_lock_is_bounded_and_says_so(tmp_path):
    out = str(tmp_path / "out")
    holder = OutputLock(out).__enter__()
    t0 = time.monotonic()
    with pytest.raises(OutputLockedError, match=r"waited 0.5 s"):
        with OutputLock(out, wait=0.5):
            pass
    assert time.monotonic() - t0 < 5
    threading.Timer(0.5, holder.__exit__, (None, None, None)).start()
    with OutputLock(out, wait=30):  # released by the other holder while waiting: taken, no error
        pass


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX file modes")
def test_a_no_op_rerun_over_read_only_shards_succeeds(tmp_path, tiny):
    from tests.stage1.test_bad_inputs import python_obeying_file_modes

    python = python_obeying_file_modes()
    if python is None:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE here, so file modes cannot be enforced")
    root = make_image_tree(tmp_path / "imgs", per_class=2, size=48, classes=("cat",))
    out = tmp_path / "shared" / "features"
    _extract(root, out, tiny)
    args = ["-m", "stage1_extract", "--images", str(root), "--out", str(out), "--onnx", str(tiny),
            "--input-size", "32", "--workers", "1", "--no-progress"]
    (out.parent / "features.meta" / "lock").unlink()  # as on a copy: the lock file is not there either
    read_only = [out, out.parent / "features.meta", out.parent]
    for d in read_only:
        d.chmod(0o555)
    try:
        r = subprocess.run(python + args, capture_output=True, text=True, timeout=300, cwd=REPO)
        make_image_tree(tmp_path / "more", per_class=1, size=40, classes=("cat",))
        (tmp_path / "more" / "cat" / "cat_000.jpg").rename(root / "cat" / "added.jpg")
        changed = subprocess.run(python + args, capture_output=True, text=True, timeout=300, cwd=REPO)
    finally:
        for d in reversed(read_only):
            d.chmod(0o755)
    assert r.returncode == 0 and "already done 2" in r.stdout, r.stdout + r.stderr  # before: OUT.meta/lock
    assert changed.returncode != 0 and "read-only" in changed.stderr and "Traceback" not in changed.stderr, \
        changed.stderr


# ---- shard integrity -------------------------------------------------------------------------------------------

def _flip_a_feature_byte(shard: str) -> None:
    meta = pq.ParquetFile(shard).metadata
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    chunk = meta.row_group(0).column(next(i for i, n in enumerate(names) if n.startswith("feature")))
    where = chunk.data_page_offset + chunk.total_compressed_size // 2
    raw = bytearray(Path(shard).read_bytes())
    raw[where] ^= 0x10
    Path(shard).write_bytes(bytes(raw))


def test_a_bit_flip_inside_a_shard_is_found_and_the_message_says_what_to_do(tmp_path):
    shards = write_synthetic_shards(tmp_path / "shards", shards=2)
    victim = shardformat.list_shards(shards)[0]
    _flip_a_feature_byte(victim)
    with pytest.raises(ShardFormatError) as info:  # before: read without a word, trained on
        shardformat.read_features(shards)
    text = str(info.value)
    assert victim in text and "damaged" in text and "delete" in text and "stage1-extract" in text


def test_a_rerun_replaces_a_damaged_shard(tmp_path, tiny):
    root = make_image_tree(tmp_path / "imgs", per_class=2, size=48, classes=("cat", "coffee"))
    out = tmp_path / "out"
    _extract(root, out, tiny, shard_size=2, batch_size=2)
    good = shardformat.read_features(out)
    victim = shardformat.list_shards(out)[0]
    _flip_a_feature_byte(victim)
    with pytest.raises(ShardFormatError, match="damaged"):
        shardformat.read_features(out)
    s = _extract(root, out, tiny, shard_size=2, batch_size=2)
    assert (s.extracted, s.already_done, s.removed_rows) == (2, 2, 2)  # before: nothing to do, still damaged
    assert victim not in shardformat.list_shards(out)
    again = shardformat.read_features(out)
    np.testing.assert_allclose(again.features[np.argsort(again.paths)], good.features[np.argsort(good.paths)],
                               rtol=1e-5)


def test_shards_written_without_checksums_are_still_read(tmp_path):
    shards = write_synthetic_shards(tmp_path / "shards", shards=1)
    shard = shardformat.list_shards(shards)[0]
    table = pq.read_table(shard)
    pq.write_table(table, shard, write_page_checksum=False)  # as older versions wrote them
    assert len(shardformat.read_features(shards)) == len(table)


# ---- a user ONNX model with external data -----------------------------------------------------------------------

def test_replacing_an_onnx_models_external_weights_changes_its_identity(tmp_path):
    import onnx

    from stage1_extract.model.export import wrap_user_onnx

    def save_with_external_data(seed: int) -> Path:
        model = onnx.load(str(make_tiny_onnx(tmp_path / f"src{seed}.onnx", seed=seed)))
        path = tmp_path / "model" / "net.onnx"
        path.parent.mkdir(exist_ok=True)
        for stale in path.parent.iterdir():
            stale.unlink()
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="net.weights", size_threshold=0)
        return path

    path = save_with_external_data(0)
    first = wrap_user_onnx(path, input_size=32)
    graph_bytes = path.read_bytes()
    save_with_external_data(1)  # new weights file, same graph file
    assert path.read_bytes() == graph_bytes
    second = wrap_user_onnx(path, input_size=32)
    assert second.weights_id != first.weights_id  # before: the same key, the old model's cached export
    assert second.onnx_sha256 != first.onnx_sha256


@pytest.mark.parametrize("decoder", ["torch-cpu", "nvimgcodec-cpu"])
def test_a_header_only_jpeg_is_refused_by_the_gpu_decoders_too(tmp_path, tiny, decoder):
    """The GPU decoders (run here on their CPU back ends) hand a header-only JPEG to PIL, which records it."""
    if decoder == "nvimgcodec-cpu":
        pytest.importorskip("nvidia.nvimgcodec")
    with_eoi, _ = _header_only_jpeg()
    root = make_image_tree(tmp_path / "imgs", per_class=1, size=48, classes=("cat",))
    (root / "cat" / "header_only.jpg").write_bytes(with_eoi)
    s = extract(root, tmp_path / "out", onnx=tiny, input_size=32, decode=decoder, progress=False)
    assert (s.extracted, s.errors) == (1, 1)
    errors = shardformat.read_errors(tmp_path / "out")
    assert errors[0]["path"] == "cat/header_only.jpg" and "no image data" in errors[0]["reason"]
