"""Bad-input corpus: every odd file a user's collection may hold is either processed correctly or recorded in
the errors table (``OUT.meta/errors.parquet``) with a readable reason, and the run never aborts (unless ``strict``).

One class-folder tree holds every kind (``build_corpus``); one extraction runs over it (tiny ONNX model, so it
takes seconds) and each kind is checked on its own. Where a kind must be *processed correctly*, its features
are compared with those of a reference image made independently (by hand with numpy where possible) and
extracted in the same way.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import shardformat
from shardformat.layout import errors_path, meta_file
from stage1_extract import StrictModeError, extract
from tests.support.helpers import make_tiny_onnx, photo

REPO = Path(__file__).resolve().parents[2]
INPUT_SIZE = 32
WEIRD_NAME = "spaces and ünïcödé 名前\nwith a newline.jpg"
NON_UTF8_NAME = b"latin1-\xe9t\xe9.jpg"
NON_UTF8_PATH = "b/" + os.fsdecode(NON_UTF8_NAME).encode("utf-8", "backslashreplace").decode()

# kind, path in the tree (as shards and the errors table spell it), expected outcome, part of the reason.
# Outcomes: "ok" (extracted, features checked where a reference exists), "error" (in the errors table with a
# reason containing the text), "ignored" (hidden files: neither), "empty-class" (reported in the summary).
KINDS: list[tuple[str, str, str, str | None]] = [
    ("good PNG", "a/good.png", "ok", None),
    ("zero-byte file", "a/zero.jpg", "error", "empty file (0 bytes)"),
    ("truncated JPEG", "a/truncated.jpg", "error", "truncated"),
    ("truncated PNG", "a/truncated.png", "error", "cannot decode image"),
    ("text file named .jpg", "a/text.jpg", "error", "not an image PIL can identify"),
    ("JPEG named .png", "a/jpeg_named.png", "ok", None),
    ("CMYK JPEG", "a/cmyk.jpg", "ok", None),
    ("16-bit grayscale PNG", "a/gray16.png", "ok", None),
    ("palette PNG with transparency", "a/palette_transparent.png", "ok", None),
    ("RGBA PNG", "a/rgba.png", "ok", None),
    ("EXIF-rotated JPEG", "a/exif_rotated.jpg", "ok", None),
    ("animated GIF", "a/animated.gif", "ok", None),
    ("multi-page TIFF", "b/multipage.tiff", "ok", None),
    ("WebP", "b/image.webp", "ok", None),
    ("1x1 image", "b/one_pixel.png", "ok", None),
    ("very wide image 10000x10", "b/wide.png", "ok", None),
    ("decompression bomb (over 2x the limit)", "b/bomb.png", "error", "decompression bomb"),
    ("decompression bomb (over the limit)", "b/bomb_warning.png", "error", "decompression bomb"),
    ("name with spaces, non-ASCII and newline", f"b/{WEIRD_NAME}", "ok", None),
    ("symlink loop (file)", "b/loop1.jpg", "error", "symbolic link"),
    ("symlink loop (folder)", "b/self", "error", "symbolic link loop"),
    ("empty class folder", "empty", "empty-class", None),
    ("broken symlink", "b/dangling.jpg", "error", "broken symbolic link"),
    ("non-UTF-8 file name", NON_UTF8_PATH, "error", "not valid UTF-8"),
    ("FIFO named .jpg", "b/fifo.jpg", "error", "not a regular file"),
    ("folder named .jpg", "b/folder.jpg/inside.png", "ok", None),
    ("file over the 512 MiB limit", "b/huge.jpg", "error", "over the 512 MiB limit"),
    ("non-image extension", "b/notes.txt", "error", "is not an image type"),
    ("JPEG with invalid EXIF orientation", "a/bad_exif.jpg", "ok", None),
    ("JPEG with garbage EXIF", "a/garbage_exif.jpg", "ok", None),
    ("hidden files", "a/.DS_Store", "ignored", None),
    ("1-bit PNG", "b/bilevel.png", "ok", None),
    ("32-bit float TIFF", "b/float.tiff", "ok", None),
    ("file outside any class folder", "stray.png", "error", "has no class"),
    ("32-bit float TIFF with inf and NaN pixels", "b/float_inf.tiff", "ok", None),
]
EXPECTED = {k: (outcome, reason) for k, _, outcome, reason in KINDS}
PATHS = {k: path for k, path, _, _ in KINDS}


# --------------------------------------------------------------------------------------------- corpus

def _crop(name: str, w: int, h: int) -> Image.Image:
    img = photo(name)
    return img.resize((w, h), Image.Resampling.BILINEAR)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny file whose header claims ``width × height`` pixels (grey, 8 bit): PIL must refuse it on open."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _save(img: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return path


def _png_ref(arr: np.ndarray, refs: Path, name: str) -> None:
    """A lossless RGB reference for a kind that must be processed correctly."""
    _save(Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), "RGB"), refs / f"{name}.png")


def build_corpus(root: Path, refs: Path) -> None:
    """Write every kind of bad or odd input under ``root`` (class folders a/, b/, empty/) and references in ``refs``."""
    a, b = root / "a", root / "b"
    a.mkdir(parents=True)
    b.mkdir()
    (root / "empty").mkdir()
    refs.mkdir(parents=True)
    base = _crop("chelsea", 60, 40)
    base_arr = np.asarray(base)

    # a plain good image, so the run has something normal to do
    _save(base, a / "good.png")
    _png_ref(base_arr, refs, "good")

    # 1. zero-byte file
    (a / "zero.jpg").write_bytes(b"")

    # 2. truncated JPEG / 3. truncated PNG
    full_jpeg = io.BytesIO()
    _crop("coffee", 64, 48).save(full_jpeg, "JPEG", quality=90)
    (a / "truncated.jpg").write_bytes(full_jpeg.getvalue()[: len(full_jpeg.getvalue()) // 2])
    full_png = io.BytesIO()
    _crop("coffee", 64, 48).save(full_png, "PNG")
    (a / "truncated.png").write_bytes(full_png.getvalue()[: len(full_png.getvalue()) // 2])

    # 4. a text file named .jpg
    (a / "text.jpg").write_text("this is not a picture\n" * 20)

    # 5. a JPEG named .png (content decides, not the extension): same features as the same bytes named .jpg
    (a / "jpeg_named.png").write_bytes(full_jpeg.getvalue())
    (refs / "jpeg_named.jpg").write_bytes(full_jpeg.getvalue())

    # 6. CMYK JPEG: PIL's CMYK→RGB conversion
    cmyk = base.convert("CMYK")
    _save(cmyk, a / "cmyk.jpg", "JPEG", quality=95)
    with Image.open(a / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
        _png_ref(np.asarray(im.convert("RGB")), refs, "cmyk")

    # 7. 16-bit grayscale PNG: the robust percentile window (by hand: 0.5th–99.5th percentile → 0..255, rounded)
    ramp = (np.linspace(0, 65535, 60 * 40).reshape(40, 60) + np.asarray(base.convert("L"), np.float64) * 50) % 65536
    ramp = ramp.astype(np.uint16)
    _save(Image.fromarray(ramp), a / "gray16.png")
    with Image.open(a / "gray16.png") as im:
        assert im.mode.startswith("I"), im.mode
    lo, hi = np.percentile(ramp.astype(np.float64), [0.5, 99.5])
    g8 = np.rint(np.clip((ramp - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    _png_ref(np.repeat(g8[..., None], 3, axis=2), refs, "gray16")

    # 8. palette PNG with a transparent index: transparent pixels over white (by hand)
    pal_img = base.quantize(colors=16)
    idx = np.asarray(pal_img).copy()
    idx[:10, :] = 3  # a band of the transparent index
    palette = np.asarray(pal_img.getpalette()[: 16 * 3], np.uint8).reshape(16, 3)
    p = Image.fromarray(idx, "P")
    p.putpalette(palette.reshape(-1).tolist())
    _save(p, a / "palette_transparent.png", transparency=3)
    with Image.open(a / "palette_transparent.png") as im:
        assert im.mode == "P" and "transparency" in im.info
    rgb = palette[idx]
    rgb[idx == 3] = 255
    _png_ref(rgb, refs, "palette_transparent")

    # 9. RGBA PNG: fully transparent pixels become white, opaque ones keep their colour (by hand)
    alpha = np.full(base_arr.shape[:2], 255, np.uint8)
    alpha[:, :20] = 0
    _save(Image.fromarray(np.dstack([base_arr, alpha]), "RGBA"), a / "rgba.png")
    want = base_arr.copy()
    want[:, :20] = 255
    _png_ref(want, refs, "rgba")

    # 10. EXIF-rotated JPEG (orientation 6: rotate 90° clockwise to display) = the same pixels rotated by hand
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(base, a / "exif_rotated.jpg", "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(a / "exif_rotated.jpg") as im:
        assert im.getexif().get(0x0112) == 6
        stored = np.asarray(im.convert("RGB"))  # the pixels as stored, before orientation
    _png_ref(np.rot90(stored, k=-1), refs, "exif_rotated")  # clockwise, by hand
    _png_ref(stored, refs, "exif_unrotated")  # to show the rotation matters

    # 11. animated GIF: the first frame
    frames = [Image.fromarray(np.full((40, 60, 3), c, np.uint8)) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    frames[0] = Image.fromarray(np.where(np.arange(60)[None, :, None] < 30, frames[0], 250).astype(np.uint8))
    _save(frames[0], a / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(a / "animated.gif") as im:
        assert im.n_frames == 3
        _png_ref(np.asarray(im.convert("RGB")), refs, "animated")
        im.seek(1)
        _png_ref(np.asarray(im.convert("RGB")), refs, "animated_frame1")

    # 12. multi-page TIFF: the first page
    pages = [base, _crop("astronaut", 60, 40), _crop("rocket", 60, 40)]
    _save(pages[0], b / "multipage.tiff", save_all=True, append_images=pages[1:])
    with Image.open(b / "multipage.tiff") as im:
        assert im.n_frames == 3

    # 13. WebP (lossless): the same pixels as the PNG
    _save(_crop("astronaut", 60, 40), b / "image.webp", "WEBP", lossless=True)
    _png_ref(np.asarray(_crop("astronaut", 60, 40)), refs, "webp")

    # 14. 1×1 pixel
    _save(Image.new("RGB", (1, 1), (10, 120, 230)), b / "one_pixel.png")
    _png_ref(np.full((50, 50, 3), (10, 120, 230), np.uint8), refs, "one_pixel")

    # 15. a very wide image (10000×10)
    wide = np.zeros((10, 10000, 3), np.uint8)
    wide[..., 0] = (np.arange(10000) % 256)[None, :]
    wide[..., 1] = 90
    _save(Image.fromarray(wide), b / "wide.png")

    # 16. decompression bombs: header claims more pixels than PIL's limit (error level and warning level)
    (b / "bomb.png").write_bytes(_bomb_png(30000, 30000))
    (b / "bomb_warning.png").write_bytes(_bomb_png(10000, 10000))

    # 17. a file name with spaces, non-ASCII characters and a newline
    (b / WEIRD_NAME).write_bytes(full_jpeg.getvalue())

    # 18. symbolic link loops: a file link cycle and a folder link to its own parent
    os.symlink("loop2.jpg", b / "loop1.jpg")
    os.symlink("loop1.jpg", b / "loop2.jpg")
    os.symlink(".", b / "self")

    # 19. an empty class folder

    # 20. a broken symbolic link
    os.symlink("does-not-exist.jpg", b / "dangling.jpg")

    # 21. a file name that is not valid UTF-8
    with open(os.path.join(os.fsencode(b), NON_UTF8_NAME), "wb") as fh:
        fh.write(full_jpeg.getvalue())

    # 22. a FIFO named .jpg (opening it would block forever)
    os.mkfifo(b / "fifo.jpg")

    # 23. a folder named like an image, holding an image: walked as a folder
    _save(base, b / "folder.jpg" / "inside.png")

    # 24. a file over the size limit (sparse: costs no disk)
    with open(b / "huge.jpg", "wb") as fh:
        fh.write(full_jpeg.getvalue())
        fh.truncate(600 * 2**20)

    # 25. a non-image extension
    (b / "notes.txt").write_text("hello")

    # 26. a JPEG with a damaged EXIF block (bad orientation value and garbage): processed, orientation ignored
    bad_exif = Image.Exif()
    bad_exif[0x0112] = 9  # not a valid orientation
    _save(base, a / "bad_exif.jpg", "JPEG", quality=95, exif=bad_exif.tobytes())

    # 27. a JPEG with garbage EXIF bytes
    raw = io.BytesIO()
    base.save(raw, "JPEG", quality=95, exif=b"Exif\x00\x00" + os.urandom(64))
    (a / "garbage_exif.jpg").write_bytes(raw.getvalue())

    # 28. hidden files (macOS ._ and .DS_Store) are ignored, not errors
    (a / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (a / "._good.png").write_bytes(b"\x00\x05\x16\x07")

    # 29. 1-bit and 32-bit float TIFF modes
    _save(base.convert("1"), b / "bilevel.png")
    _save(Image.fromarray(np.asarray(base.convert("L"), np.float32) / 255.0, "F"), b / "float.tiff")

    # 30. a file at the top of a class-folder tree has no class
    _save(base, root / "stray.png")

    # 31. float pixels that are ±inf or NaN: one such pixel must not blacken the image. Reference: the same
    # image with +inf → the largest finite value, -inf → the smallest, NaN → 0, written by hand.
    f = np.asarray(base.convert("L"), np.float32) * 4.0 + 10.0
    f[18:22, 25:35] = np.inf
    f[20, 36:40] = -np.inf
    f[21, 20:24] = np.nan
    _save(Image.fromarray(f, "F"), b / "float_inf.tiff")
    finite = f[np.isfinite(f)]
    by_hand = np.where(np.isposinf(f), finite.max(), np.where(np.isneginf(f), finite.min(), np.nan_to_num(f, nan=0.0)))
    _save(Image.fromarray(by_hand.astype(np.float32), "F"), refs / "float_inf.tiff")
    _save(Image.fromarray(np.zeros_like(by_hand, np.float32), "F"), refs / "float_black.tiff")

    for kind, path, _, _ in KINDS:  # the table and the tree agree
        assert os.path.lexists(os.path.join(os.fsencode(root), os.fsencode(path) if kind != "non-UTF-8 file name"
                                            else b"b/" + NON_UTF8_NAME)), kind


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Build the corpus once, extract it (and the references) once; tests inspect the result per kind."""
    base = tmp_path_factory.mktemp("bad-inputs")
    root, refs = base / "images", base / "refs"
    build_corpus(root, refs)
    tiny = make_tiny_onnx(base / "tiny.onnx", channels=16)
    out = base / "out"
    summary = extract(root, out, onnx=tiny, input_size=INPUT_SIZE, batch_size=4, workers=1, progress=False)
    extract(refs, base / "refs-out", onnx=tiny, input_size=INPUT_SIZE, batch_size=4, workers=1, progress=False)
    table = pq.read_table(out)
    feats = dict(zip(table.column("path").to_pylist(), np.asarray(table.column("feature").to_pylist(), np.float32)))
    rt = pq.read_table(base / "refs-out")
    ref = dict(zip(rt.column("path").to_pylist(), np.asarray(rt.column("feature").to_pylist(), np.float32)))
    errors = pq.read_table(errors_path(out)).to_pylist()
    return dict(base=base, root=root, out=out, tiny=tiny, summary=summary, feats=feats, ref=ref, errors=errors,
                paths=table.column("path").to_pylist())


def test_corpus_has_at_least_15_kinds():
    bad = [k for k, _, outcome, _ in KINDS if k != "good PNG"]
    assert len(bad) >= 15 and len(EXPECTED) == len(KINDS), bad


def _check_kind(kind, corpus):
    outcome, reason = EXPECTED[kind]
    path = PATHS[kind]
    errors = {e["path"]: e["reason"] for e in corpus["errors"]}
    feats = corpus["feats"]
    if outcome == "ok":
        assert path in feats, f"{kind}: {path!r} not extracted; errors table says {errors.get(path)!r}"
        assert path not in errors
        assert np.isfinite(feats[path]).all()
    elif outcome == "error":
        assert path in errors, f"{kind}: {path!r} not in the errors table ({sorted(errors)})"
        assert path not in feats
        text = errors[path]
        assert reason in text, f"{kind}: reason {text!r} lacks {reason!r}"
        # readable: one short line of plain words, not a traceback
        assert 5 < len(text) < 300 and "Traceback" not in text and "\n" not in text, text
    elif outcome == "ignored":
        assert path not in feats and path not in errors
    elif outcome == "empty-class":
        assert path in corpus["summary"].empty_classes
        assert not any(p.startswith(path + "/") for p in feats)
    else:  # pragma: no cover
        raise AssertionError(outcome)


@pytest.mark.parametrize("kind", [k for k, _, _, _ in KINDS])
def test_each_kind_is_processed_or_recorded(kind, corpus):
    _check_kind(kind, corpus)


def test_run_did_not_abort_and_counts_add_up(corpus):
    s = corpus["summary"]
    n_ok = sum(o == "ok" for o, _ in EXPECTED.values())
    n_err = sum(o == "error" for o, _ in EXPECTED.values())
    assert s.extracted == n_ok == len(corpus["feats"]), (s, sorted(corpus["feats"]))
    # exactly the bad files: each error kind's path, plus the second link of the file symlink cycle
    want_errors = {path for _, path, outcome, _ in KINDS if outcome == "error"} | {"b/loop2.jpg"}
    assert {e["path"] for e in corpus["errors"]} == want_errors
    assert s.errors == len(want_errors) == len(corpus["errors"]), corpus["errors"]
    assert len(corpus["paths"]) == len(set(corpus["paths"]))  # exactly once
    assert Path(meta_file(corpus["out"], "run.json")).is_file()
    # every finished shard opens and validates
    assert len(shardformat.read_features(corpus["out"])) == n_ok


def _same(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,ref", [
    ("good PNG", "good.png"),
    ("JPEG named .png", "jpeg_named.jpg"),
    ("CMYK JPEG", "cmyk.png"),
    ("16-bit grayscale PNG", "gray16.png"),
    ("palette PNG with transparency", "palette_transparent.png"),
    ("RGBA PNG", "rgba.png"),
    ("EXIF-rotated JPEG", "exif_rotated.png"),
    ("animated GIF", "animated.png"),
    ("multi-page TIFF", "good.png"),
    ("WebP", "webp.png"),
    ("1x1 image", "one_pixel.png"),
    ("name with spaces, non-ASCII and newline", "jpeg_named.jpg"),
    ("folder named .jpg", "good.png"),
    ("32-bit float TIFF with inf and NaN pixels", "float_inf.tiff"),
])
def test_processed_kinds_have_the_right_features(kind, ref, corpus):
    _same(corpus["feats"][PATHS[kind]], corpus["ref"][ref])


def test_references_are_not_vacuous(corpus):
    """The checks above would pass trivially if rotation or frame choice did not change features."""
    ref = corpus["ref"]
    assert not np.allclose(ref["exif_rotated.png"], ref["exif_unrotated.png"], atol=1e-3)
    assert not np.allclose(ref["animated.png"], ref["animated_frame1.png"], atol=1e-3)
    assert not np.allclose(corpus["feats"][PATHS["multi-page TIFF"]], ref["webp.png"], atol=1e-3)
    assert not np.allclose(ref["float_inf.tiff"], ref["float_black.tiff"], atol=1e-3)


def test_weird_name_is_stored_exactly(corpus):
    assert f"b/{WEIRD_NAME}" in corpus["paths"]
    labels = pq.read_table(corpus["out"]).to_pydict()
    row = labels["path"].index(f"b/{WEIRD_NAME}")
    assert labels["label"][row] == "b"


def test_rerun_is_a_no_op_with_the_same_errors(corpus, tmp_path):
    s = extract(corpus["root"], corpus["out"], onnx=corpus["tiny"], input_size=INPUT_SIZE, batch_size=4, workers=1,
                progress=False)
    assert s.extracted == 0 and s.already_done == len(corpus["feats"])
    assert s.errors == len(corpus["errors"])
    assert sorted(pq.read_table(errors_path(corpus["out"])).to_pylist(), key=lambda e: e["path"]) == \
        sorted(corpus["errors"], key=lambda e: e["path"])


def test_strict_mode_stops_at_a_bad_file(corpus, tmp_path):
    with pytest.raises(StrictModeError, match="--strict: "):
        extract(corpus["root"], tmp_path / "strict", onnx=corpus["tiny"], input_size=INPUT_SIZE, progress=False,
                strict=True, workers=1)


# ------------------------------------------------------------------------------------- unreadable files

# Run a Python child without CAP_DAC_OVERRIDE (1) and CAP_DAC_READ_SEARCH (2): dropped from the bounding set
# before exec, so even root then obeys file modes. Decode workers (spawned children) inherit it.
_NO_DAC = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL('libc.so.6', use_errno=True)\n"
    "for cap in (1, 2):\n"
    "    if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP\n"
    "        sys.exit(f'cannot drop capability {cap}: errno {ctypes.get_errno()}')\n"
    "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n"
)


def python_obeying_file_modes() -> list[str] | None:
    """A command prefix for a Python that is denied a chmod-000 file, or None if this cannot be arranged."""
    if os.geteuid() != 0:
        return [sys.executable]
    prefix = [sys.executable, "-c", _NO_DAC]
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe"
        probe.write_text("x")
        probe.chmod(0)
        try:
            r = subprocess.run(prefix + ["-c", f"open({str(probe)!r}).read()"], capture_output=True, text=True,
                               timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        return prefix if r.returncode != 0 and "PermissionError" in r.stderr else None


def test_unreadable_file_and_folder_are_recorded_not_fatal(tmp_path):
    """A file without read permission and a folder that cannot be listed.

    Root reads any file whatever its mode, so as root the extraction runs in a child that has dropped the
    capabilities that let root bypass file modes (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH): the permission check
    is then the kernel's own, not a simulation. Without root, chmod alone does it.
    """
    python = python_obeying_file_modes()
    if python is None:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE here, so file modes cannot be enforced")
    root = tmp_path / "images"
    _save(_crop("chelsea", 60, 40), root / "a" / "readable.png")
    _save(_crop("coffee", 60, 40), root / "a" / "secret.png")
    _save(_crop("coffee", 60, 40), root / "a" / "locked" / "inner.png")
    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    out = tmp_path / "out"
    (root / "a" / "secret.png").chmod(0o000)
    (root / "a" / "locked").chmod(0o000)
    try:
        r = subprocess.run(
            python + ["-m", "stage1_extract", "--images", str(root), "--out", str(out), "--onnx", str(tiny),
                      "--input-size", str(INPUT_SIZE), "--workers", "1", "--no-progress"],
            capture_output=True, text=True, timeout=300, cwd=REPO,
        )
    finally:
        (root / "a" / "secret.png").chmod(0o644)
        (root / "a" / "locked").chmod(0o755)
    assert r.returncode == 0, r.stderr
    errors = {e["path"]: e["reason"] for e in pq.read_table(errors_path(out)).to_pylist()}
    assert errors.get("a/secret.png") == "permission denied", errors
    assert "Permission denied" in errors.get("a/locked", ""), errors
    assert pq.read_table(out).column("path").to_pylist() == ["a/readable.png"]
    assert "errors 2" in r.stdout


def test_fifo_in_a_file_list_is_recorded_not_waited_on(tmp_path):
    """A named pipe listed in a CSV is not filtered by the folder walk; opening it for reading blocks until a
    writer appears, which used to hang the decode worker (and the run) forever."""
    root = tmp_path / "imgs"
    _save(_crop("chelsea", 60, 40), root / "good.png")
    os.mkfifo(root / "pipe.jpg")
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\nimgs/good.png,a\nimgs/pipe.jpg,b\n/dev/zero,c\n")
    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    out = tmp_path / "out"
    try:
        r = subprocess.run([sys.executable, "-m", "stage1_extract", "--images", str(listing), "--out", str(out),
                            "--onnx", str(tiny), "--input-size", str(INPUT_SIZE), "--workers", "1", "--no-progress"],
                           capture_output=True, text=True, timeout=90, cwd=REPO)
    except subprocess.TimeoutExpired:
        pytest.fail("the run hung on a FIFO listed in the file list")
    assert r.returncode == 0, r.stderr
    errors = {e["path"]: e["reason"] for e in pq.read_table(errors_path(out)).to_pylist()}
    assert errors == {"imgs/pipe.jpg": "not a regular file", "/dev/zero": "not a regular file"}, errors
    assert pq.read_table(out).column("path").to_pylist() == ["imgs/good.png"]


def test_a_file_replaced_by_a_fifo_after_listing_does_not_hang_the_decoder(tmp_path):
    """The race behind the test above, at the decoder itself: a path that is a FIFO by the time it is opened."""
    fifo = tmp_path / "late.jpg"
    os.mkfifo(fifo)
    code = ("import numpy as np, sys\n"
            "from stage1_extract.decoding.pool import _decode_one\n"
            "from stage1_extract.model.preprocessing import Preprocessing\n"
            "buf = np.zeros((32, 32, 3), np.uint8)\n"
            f"print(_decode_one({str(fifo)!r}, Preprocessing(32, 37), False, buf)[0])\n")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    except subprocess.TimeoutExpired:
        pytest.fail("decoding a FIFO blocked")
    assert r.returncode == 0 and r.stdout.strip() == "not a regular file", r.stdout + r.stderr
