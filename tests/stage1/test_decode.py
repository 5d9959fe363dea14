"""Decoding: every PIL mode to correct RGB, EXIF orientation, resize/crop geometry, readable failures."""

import io

import numpy as np
import pytest
from PIL import Image

from stage1_extract.model.registry import get_backbone
from stage1_extract.decoding.image import DecodeError, decode_image, reference_preprocess, to_rgb
from tests.support.helpers import photo

PREP = get_backbone("efficientnet_lite0").preprocessing


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def chelsea():
    return photo("chelsea")


def test_output_shape_and_dtype(chelsea):
    out = decode_image(encode(chelsea, "PNG"), PREP)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8


def test_matches_textbook_resize_then_crop(chelsea, tmp_path):
    for name in ("chelsea", "coffee", "astronaut"):
        path = tmp_path / f"{name}.png"
        photo(name).save(path)
        for spec in ("efficientnet_lite0", "resnet50", "convnext_tiny"):
            prep = get_backbone(spec).preprocessing
            fast = decode_image(path.read_bytes(), prep).astype(int)
            ref = reference_preprocess(str(path), prep).astype(int)
            assert np.abs(fast - ref).max() <= 1 and np.abs(fast - ref).mean() < 0.01


def test_grayscale_modes_become_gray_rgb(chelsea):
    gray = chelsea.convert("L")
    want = decode_image(encode(gray.convert("RGB"), "PNG"), PREP)
    for img in (gray, gray.convert("LA")):
        got = decode_image(encode(img, "PNG"), PREP)
        assert np.abs(got.astype(int) - want).max() <= 1
        assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()


def test_16_bit_grayscale_gets_the_percentile_window(chelsea):
    """16-bit grayscale: the 0.5–99.5th percentile window (the DICOM fallback policy), by hand, not a plain /257."""
    gray8 = np.asarray(chelsea.convert("L"), dtype=np.uint16)
    img16 = Image.fromarray(gray8 * 257)  # full 16-bit range
    assert img16.mode.startswith("I")
    got = decode_image(encode(img16, "PNG"), PREP)
    values = gray8.astype(np.float64) * 257
    lo, hi = np.percentile(values, [0.5, 99.5])
    by_hand = np.rint(np.clip((values - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    want = decode_image(encode(Image.fromarray(by_hand), "PNG"), PREP)
    assert np.abs(got.astype(int) - want).max() <= 1


def test_float_mode_is_rescaled():
    arr = np.linspace(-5.0, 5.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    rgb = to_rgb(Image.fromarray(arr, mode="F"))
    px = np.asarray(rgb)
    assert px.min() == 0 and px.max() == 255


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red
    got = decode_image(encode(rgba, "PNG"), PREP)
    assert (got == 255).all()
    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([0, 0, 0] + [0, 255, 0] * 255)
    pal.info["transparency"] = 0
    got = decode_image(encode(pal, "PNG", transparency=0), PREP)
    assert (got == 255).all()


def test_cmyk_jpeg(chelsea):
    got = decode_image(encode(chelsea.convert("CMYK"), "JPEG", quality=95), PREP)
    want = decode_image(encode(chelsea, "JPEG", quality=95), PREP)
    assert np.abs(got.astype(int) - want).mean() < 6


def test_exif_orientation_is_applied(chelsea):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    tagged = decode_image(encode(chelsea, "JPEG", quality=95, exif=exif.tobytes()), PREP)
    by_hand = decode_image(encode(chelsea.transpose(Image.Transpose.ROTATE_270), "JPEG", quality=95), PREP)
    assert np.abs(tagged.astype(int) - by_hand).mean() < 2


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    got = decode_image(data, PREP)
    assert got[..., 0].mean() > 200 and got[..., 2].mean() < 50


def test_extreme_shapes():
    assert decode_image(encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), PREP).shape == (224, 224, 3)
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 10000, 3), dtype=np.uint8))
    assert decode_image(encode(wide, "PNG"), PREP).shape == (224, 224, 3)


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty file"),
        (b"this is not an image", "not an image"),
    ],
)
def test_garbage_is_a_readable_error(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_image(data, PREP)


def test_truncated_jpeg_is_an_error(chelsea):
    data = encode(chelsea, "JPEG")
    with pytest.raises(DecodeError, match="cannot decode|truncated"):
        decode_image(data[: len(data) // 3], PREP)


def test_decompression_bomb_is_refused(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(encode(Image.new("L", (100, 100)), "PNG"), PREP)


def test_draft_mode_is_close_to_full_decode():
    big = photo("astronaut").resize((2048, 2048))
    data = encode(big, "JPEG", quality=92)
    full = decode_image(data, PREP).astype(int)
    draft = decode_image(data, PREP, draft=True).astype(int)
    assert np.abs(full - draft).mean() < 4
