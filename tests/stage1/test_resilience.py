"""Whole runs under trouble: transient errors retried by the next run, crashes remembered, SIGTERM handled
like Ctrl-C, a tiny /dev/shm, ``touch`` costing one hashing pass only, huge float images within the
per-image memory budget. Faults are placed with ``STAGE1_FAULTS`` (``tests/support/faults.py``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import shardformat
import stage1_extract.run.plan as plan_module
from stage1_extract import extract
from stage1_extract.run.lock import OutputLock
from shardformat import read_errors
from tests.support.helpers import make_image_tree, make_tiny_onnx
from tests.support.faults import fault_env

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)  # a hang fails the test instead of the suite


@pytest.fixture
def tree(tmp_path):
    root = make_image_tree(tmp_path / "imgs", per_class=6, size=48)
    data = (root / "cat" / "cat_000.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    return root


@pytest.fixture
def tiny(tmp_path):
    return make_tiny_onnx(tmp_path / "tiny.onnx")


def run(tree, out, tiny, **kw):
    opts = dict(onnx=tiny, input_size=32, batch_size=4, shard_size=4, workers=2, progress=False)
    return extract(tree, out, **{**opts, **kw})


def stored_paths(out) -> list[str]:
    return shardformat.read_features(out).paths.tolist()


def test_transient_errors_are_retried_next_run_and_file_errors_remembered(tree, tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    for name, value in fault_env("eio:cat_001.jpg;oom:coffee_002.jpg;segv:space_003.jpg").items():
        monkeypatch.setenv(name, value)
    first = run(tree, out, tiny)
    errs = {e["path"]: e for e in read_errors(str(out))}
    assert set(errs) == {"cat/cat_001.jpg", "coffee/coffee_002.jpg", "space/space_003.jpg", "cat/truncated.jpg"}
    assert "Input/output error" in errs["cat/cat_001.jpg"]["reason"] and errs["cat/cat_001.jpg"]["transient"]
    assert "out of memory" in errs["coffee/coffee_002.jpg"]["reason"] and errs["coffee/coffee_002.jpg"]["transient"]
    assert errs["space/space_003.jpg"]["reason"] == "decoder process crashed on this file (SIGSEGV)"
    assert not errs["space/space_003.jpg"]["transient"] and not errs["cat/truncated.jpg"]["transient"]
    assert first.extracted == 18 - 3 and first.errors_new == 4

    monkeypatch.delenv("STAGE1_FAULTS")
    second = run(tree, out, tiny)  # memory and disk are fine again
    assert second.extracted == 2 and second.errors_known == 2 and second.errors_new == 0
    assert {e["path"] for e in read_errors(str(out))} == {"space/space_003.jpg", "cat/truncated.jpg"}
    assert len(stored_paths(out)) == 17 and len(set(stored_paths(out))) == 17


def test_touch_then_two_reruns_hash_nothing_on_the_second(tree, tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(tree, out, tiny)
    calls = []
    real = plan_module._hash_file
    monkeypatch.setattr(plan_module, "_hash_file", lambda path: calls.append(path) or real(path))
    later = time.time_ns() + 100 * 10**9
    for p in tree.rglob("*.jpg"):
        os.utime(p, ns=(later, later))
    before = pq.read_table(out).sort_by("path")
    again = run(tree, out, tiny)
    assert again.extracted == 0 and again.already_done == 18 and len(calls) == 18  # hashed once…
    calls.clear()
    third = run(tree, out, tiny)
    assert third.extracted == 0 and third.already_done == 18 and calls == []  # …and never again
    after = pq.read_table(out).sort_by("path")
    assert after.column("feature").equals(before.column("feature"))
    assert set(after.column("mtime_ns").to_pylist()) == {later}
    shardformat.read_features(out)  # the rewritten shards keep their metadata and validate


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "stage1_extract", *map(str, args)]


def _lock_free(out: Path) -> bool:
    try:
        with OutputLock(str(out)):
            return True
    except Exception:
        return False


def test_sigterm_stops_like_ctrl_c(tree, tiny, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, **fault_env("block:space_004.jpg", tmp_path)}
    args = _cli("--images", tree, "--out", out, "--onnx", tiny, "--input-size", 32, "--batch-size", 2,
                "--shard-size", 2, "--workers", 2, "--no-progress")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker = tmp_path / "space_004.jpg.blocked"
    deadline = time.monotonic() + 120
    # a worker is stuck on one image, so the run cannot end by itself; wait for a finished shard too
    while time.monotonic() < deadline and not (marker.exists() and out.exists() and shardformat.list_shards(out)):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted (SIGTERM): " in stderr and "extracted by this run are saved in" in stderr, stderr
    assert "leaked" not in stderr and "Traceback" not in stderr, stderr
    assert _lock_free(out)
    saved = stored_paths(out)
    assert saved and len(saved) == len(set(saved))
    s = run(tree, out, tiny)  # the rerun does the rest, exactly once
    assert s.already_done == len(saved) and len(stored_paths(out)) == 18 == len(set(stored_paths(out)))


def _unshare_ok() -> str | None:
    if not shutil.which("unshare"):
        return "no unshare command"
    probe = subprocess.run(["unshare", "-m", "-r", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a private /dev/shm here: {probe.stderr.strip()}"


@pytest.mark.parametrize("size,works", [("4m", True), ("200k", False)])
def test_tiny_dev_shm(tmp_path, size, works):
    reason = _unshare_ok()
    if reason:
        pytest.skip(reason)
    tree = make_image_tree(tmp_path / "imgs", per_class=4, size=64)
    tiny = make_tiny_onnx(tmp_path / "tiny224.onnx", input_size=224)
    out = tmp_path / "out"
    # batch 32 at 224 px is 4.6 MiB a batch: 4 MiB holds two batches of 12, 200 KiB not one image twice
    cmd = " ".join(map(str, _cli("--images", tree, "--out", out, "--onnx", tiny, "--input-size", 224,
                                 "--batch-size", 32, "--workers", 2, "--no-progress")))
    r = subprocess.run(["unshare", "-m", "-r", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs /dev/shm && {cmd}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "/dev/shm" in r.stderr and "--shm-size" in r.stderr, r.stderr
    if works:
        assert r.returncode == 0, r.stderr
        assert "batches of 12 images instead of 32" in r.stderr
        assert sorted(stored_paths(out)) == sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*.jpg"))
        assert read_errors(str(out)) == []
    else:
        assert r.returncode == 1 and "stage1-extract: error:" in r.stderr and "Traceback" not in r.stderr


def test_huge_float_tiff_within_the_memory_budget(tmp_path):
    # 5000×4000 float32: an 80 MB raster in a ~100 KB file; the whole-image float64 arithmetic took ~10×
    arr = np.zeros((4000, 5000), np.float32)
    arr[500:3500, 500:4500] = np.repeat(np.linspace(-3.5, 9000, 16, dtype=np.float32), 250)[None, :]
    arr[7, 7], arr[9, 9] = np.nan, np.inf
    path = tmp_path / "huge.tif"
    Image.fromarray(arr, "F").save(path, compression="tiff_deflate")
    assert path.stat().st_size < 2_000_000
    code = (
        "import resource, sys\n"
        "from stage1_extract.decoding.image import DecodeError, decode_image\n"
        "from stage1_extract.model.preprocessing import Preprocessing\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    out = decode_image(data, Preprocessing(224, 256))\n"
        "    print(int(out.min()), int(out.max()), (out[..., 0] == out[..., 2]).all())\n"
        "except DecodeError as exc:\n"
        "    print('refused:', exc)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    result, grew = r.stdout.splitlines()
    assert result == "0 240 True"  # stretched (the crop leaves out the brightest stripe), gray
    assert int(grew) < 2.5 * arr.nbytes, f"decoding took {int(grew) / 2**20:.0f} MiB more"
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                       env={**env, "STAGE1_DECODE_MEMORY_MB": "64"})
    assert "refused: image is 5000×4000 F: decoding needs about 95 MiB, over the 64 MiB per-image memory budget" \
        in r.stdout, r.stdout + r.stderr


def _whole_image_gray(img: Image.Image) -> np.ndarray:
    """The conversion as it was done on the whole image at once (float64), before banding."""
    arr = np.asarray(img)
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float64)
        finite = arr[np.isfinite(arr)]
        top, bottom = (float(finite.max()), float(finite.min())) if finite.size else (0.0, 0.0)
        arr = np.nan_to_num(arr, nan=0.0, posinf=top, neginf=bottom)
        from stage1_extract.decoding.windowing import float_scale  # 0..1 and 0..255: scales; else stretched

        black, white = float_scale(float(arr.min(initial=0)), float(arr.max(initial=0)))
        scaled = np.clip((arr - black) * (255.0 / (white - black)), 0, 255) if white > black else np.zeros_like(arr)
    else:
        if arr.max(initial=0) > 255 or arr.min(initial=0) < 0 or img.mode.startswith("I;16"):
            from stage1_extract.decoding.windowing import auto_window_uint8  # 16-bit: the DICOM percentile window

            return auto_window_uint8(arr)
        scaled = arr
    return np.rint(scaled).astype(np.uint8)


def test_banded_conversion_equals_the_whole_image_arithmetic(monkeypatch):
    from stage1_extract.decoding import image as decode

    monkeypatch.setattr(decode, "_BAND_PIXELS", 37)  # many bands, one not a whole number of rows
    rng = np.random.default_rng(0)
    floats = rng.normal(50, 400, size=(23, 17)).astype(np.float32)
    floats[3, 4], floats[5, 6], floats[7, 8] = np.nan, np.inf, -np.inf
    cases = [
        Image.fromarray(floats, "F"),
        Image.fromarray(np.clip(floats, 0, 255).astype(np.float32), "F"),  # already 0..255: kept
        Image.fromarray(np.clip(floats / 400, 0, 1).astype(np.float32), "F"),  # the 0..1 scale
        Image.fromarray(np.full((9, 40), np.nan, np.float32), "F"),  # nothing finite
        Image.fromarray(rng.integers(0, 65535, size=(31, 13)).astype(np.uint16)),  # I;16
        Image.fromarray(rng.integers(0, 200, size=(31, 13)).astype(np.int32), "I"),  # 8-bit range in I
        Image.fromarray(rng.integers(0, 70000, size=(31, 13)).astype(np.int32), "I"),
    ]
    for img in cases:
        assert np.array_equal(np.asarray(decode._wide_to_gray(img)), _whole_image_gray(img)), img.mode


def test_every_decoder_reads_through_read_image_with_the_size_limit(tree, monkeypatch):
    from stage1_extract.decoding import files as decode
    from stage1_extract.decoding.pool import _decode_one
    from stage1_extract.model.preprocessing import Preprocessing
    from stage1_extract.decoding.torch_decoder import TorchDecoder

    big = sorted(tree.rglob("cat_*.jpg"), key=lambda p: p.stat().st_size)[-1]
    monkeypatch.setattr(decode, "MAX_FILE_BYTES", big.stat().st_size - 1)
    prep = Preprocessing(32, 37)
    with TorchDecoder(prep, batch_size=4, device="cpu") as dec:
        (batch,) = list(dec.run([str(big)]))
    assert batch.items[0].row == -1 and "MiB limit" in batch.items[0].reason  # the GPU decoder's reader too
    assert "MiB limit" in _decode_one(str(big), prep, False, np.zeros((32, 32, 3), np.uint8))[0]
