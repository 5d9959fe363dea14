"""DICOM decoding on pydicom's bundled files (installed with the package, no download).

Each pixel check compares against an independent computation written here with numpy from the dataset's
own tags and raw bytes (the standard's formulas), not against the module's code path.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

from stage1_extract.decoding.image import decode_image  # noqa: E402
from stage1_extract.decoding.dicom import DicomError, dicom_pixels, is_dicom, split_frame_ref  # noqa: E402
from stage1_extract.model.preprocessing import Preprocessing  # noqa: E402
from stage1_extract.decoding.windowing import window_unit  # noqa: E402

PREP = Preprocessing(input_size=32, resize=36)


def bundled(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom")
    return path


def read_bytes(name: str) -> bytes:
    with open(bundled(name), "rb") as fh:
        return fh.read()


def dataset(name: str):
    return pydicom.dcmread(bundled(name))


def to_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def stored_values(ds) -> np.ndarray:
    """Native little-endian pixel data by hand: dtype from BitsAllocated and PixelRepresentation."""
    dtype = {(16, 0): "<u2", (16, 1): "<i2", (8, 0): "u1", (32, 0): "<u4"}[(ds.BitsAllocated, ds.PixelRepresentation)]
    return np.frombuffer(ds.PixelData, dtype=dtype).reshape(ds.Rows, ds.Columns).astype(np.float64)


def linear_window_by_hand(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 written out, scaled to 0..255."""
    lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    y = ((x - (center - 0.5)) / (width - 1) + 0.5)
    y = np.where(x <= lo, 0.0, np.where(x > hi, 1.0, y))
    return np.rint(y * 255).astype(np.uint8)


def gray(rgb: np.ndarray) -> np.ndarray:
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    return rgb[..., 0]


def test_ct_percentile_window_matches_hand_computation():
    ds = dataset("CT_small.dcm")
    assert "WindowCenter" not in ds and float(ds.RescaleIntercept) == -1024
    hu = stored_values(ds) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    lo, hi = np.percentile(hu, [0.5, 99.5])
    want = np.rint(np.clip((hu - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    got = gray(dicom_pixels(read_bytes("CT_small.dcm")))
    assert np.abs(got.astype(int) - want).max() <= 1
    assert (got == want).mean() > 0.99


def test_ct_stated_window_in_hounsfield_units():
    ds = dataset("CT_small.dcm")
    ds.WindowCenter, ds.WindowWidth = 40, 400  # soft-tissue window, stated in HU (after rescale)
    hu = stored_values(ds) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    want = linear_window_by_hand(hu, 40, 400)
    got = gray(dicom_pixels(to_bytes(ds)))
    assert np.abs(got.astype(int) - want).max() <= 1
    assert 0 < want.mean() < 255  # the window cuts both ends of this slice


def test_mr_window_center_width():
    ds = dataset("MR_small.dcm")
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    want = linear_window_by_hand(stored_values(ds), center, width)
    got = gray(dicom_pixels(read_bytes("MR_small.dcm")))
    assert np.abs(got.astype(int) - want).max() <= 1


def test_voi_lut_function_sigmoid_and_exact():
    x = np.array([-100.0, 0.0, 50.0, 100.0, 200.0])
    assert np.allclose(window_unit(x, 50, 100, "SIGMOID"), 1 / (1 + np.exp(-4 * (x - 50) / 100)))
    assert np.allclose(window_unit(x, 50, 100, "LINEAR_EXACT"), [0, 0, 0.5, 1, 1])
    with pytest.raises(ValueError):
        window_unit(x, 50, 0.5, "LINEAR")


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
                                  "MR_small_expb.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm", "MR_small_padded.dcm"])
def test_lossless_encodings_give_the_same_pixels(name):
    reference = dicom_pixels(read_bytes("MR_small.dcm"))
    assert np.array_equal(dicom_pixels(read_bytes(name)), reference)
    assert np.array_equal(decode_image(read_bytes(name), PREP), decode_image(read_bytes("MR_small.dcm"), PREP))


def test_monochrome1_is_inverted():
    ds = dataset("MR_small.dcm")
    normal = gray(dicom_pixels(to_bytes(ds)))
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = gray(dicom_pixels(to_bytes(ds)))
    assert np.array_equal(inverted, 255 - normal)


def test_palette_color_by_hand():
    ds = dataset("examples_palette.dcm")
    first = ds.RedPaletteColorLookupTableDescriptor[1]
    index = np.frombuffer(ds.PixelData, np.uint8).reshape(ds.Rows, ds.Columns).astype(int) - first
    luts = [np.frombuffer(ds[f"{c}PaletteColorLookupTableData"].value, "<u2")
            for c in ("Red", "Green", "Blue")]
    want = np.stack([(lut[np.clip(index, 0, len(lut) - 1)] >> 8) for lut in luts], axis=-1).astype(np.uint8)
    got = dicom_pixels(read_bytes("examples_palette.dcm"))
    assert np.array_equal(got, want)
    assert len({tuple(p) for p in got.reshape(-1, 3)[::50]}) > 10  # really colour, not grey


def test_ybr_full_422_to_rgb_by_hand():
    ds = dataset("SC_ybr_full_422_uncompressed.dcm")
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    # Uncompressed 4:2:2: each pair of pixels is stored as Y1 Y2 Cb Cr (PS3.3 C.7.6.3.1.2)
    quads = np.frombuffer(ds.PixelData, np.uint8).reshape(ds.Rows, ds.Columns // 2, 4).astype(np.float64)
    y = quads[..., :2].reshape(ds.Rows, ds.Columns)
    cb = np.repeat(quads[..., 2], 2, axis=1) - 128
    cr = np.repeat(quads[..., 3], 2, axis=1) - 128
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    want = np.clip(np.rint(rgb), 0, 255)
    got = dicom_pixels(read_bytes("SC_ybr_full_422_uncompressed.dcm")).astype(np.float64)
    assert np.abs(got - want).max() <= 2
    assert np.abs(got - want).mean() < 0.6


def test_planar_configuration_by_hand():
    ds = dataset("ExplVR_BigEnd.dcm")
    assert ds.PlanarConfiguration == 1  # RRR…GGG…BBB…
    want = np.frombuffer(ds.PixelData, np.uint8).reshape(3, ds.Rows, ds.Columns).transpose(1, 2, 0)
    assert np.array_equal(dicom_pixels(read_bytes("ExplVR_BigEnd.dcm")), want)


def test_multi_frame_first_by_default_and_any_frame_on_request():
    data = read_bytes("SC_rgb_rle_2frame.dcm")
    frames = dataset("SC_rgb_rle_2frame.dcm").pixel_array
    assert np.array_equal(dicom_pixels(data), frames[0])
    assert np.array_equal(dicom_pixels(data, 1), frames[1])
    with pytest.raises(DicomError, match="frame 3 asked for; the file has 2"):
        dicom_pixels(data, 2)
    assert split_frame_ref("/x/scan.dcm#frame=2") == ("/x/scan.dcm", 1)
    assert split_frame_ref("/x/scan.dcm") == ("/x/scan.dcm", None)


def test_color_16_bit_is_scaled_to_8_bit():
    eight, sixteen = dicom_pixels(read_bytes("SC_rgb_rle.dcm")), dicom_pixels(read_bytes("SC_rgb_rle_16bit.dcm"))
    assert np.abs(eight.astype(int) - sixteen).max() <= 1


def test_recognised_by_content_not_extension():
    data = read_bytes("CT_small.dcm")
    assert data[:4] == b"II*\x00"  # a TIFF header in the preamble: PIL alone would read it as a TIFF
    assert is_dicom(data[:132])
    assert not is_dicom(b"\xff\xd8\xff\xe0" + b"\x00" * 200)
    # without the Part 10 header: the dataset's first element, in each encoding, is enough
    for name in ("rtstruct.dcm", "ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm"):
        head = read_bytes(name)[:132]
        assert head[128:132] != b"DICM" and is_dicom(head), name
    tga = b"\x08\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00\x40\x00\x40\x00\x18\x00" + b"idstring" + b"\x00" * 100
    assert not is_dicom(tga)  # a TGA with an 8-byte ID field opens with the same two bytes
    assert decode_image(data, PREP).shape == (32, 32, 3)


def unsupported_transfer_syntax() -> bytes:
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    ds = dataset("MR_small.dcm")
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2: no image decoder exists for it
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"
    return to_bytes(ds)


@pytest.mark.parametrize("name, reason", [
    ("MR_truncated.dcm", "DICOM pixel data is truncated: 8130 bytes where 1 frame(s) of 64×64 at 16 bits need 8192"),
    ("test-SR.dcm", "DICOM file has no pixel data: a Comprehensive SR Storage (modality SR), not an image"),
    ("rtstruct.dcm", "DICOM file has no pixel data: a RT Structure Set Storage (modality RTSTRUCT), not an image"),
    (None, "DICOM pixel data in transfer syntax MPEG2 Main Profile / Main Level (1.2.840.10008.1.2.4.100), "
           "which no installed decoder handles"),
])
def test_broken_files_have_readable_reasons(name, reason):
    data = read_bytes(name) if name else unsupported_transfer_syntax()
    with pytest.raises(DicomError) as exc:
        decode_image(data, PREP)
    assert str(exc.value) == reason


def test_16_bit_png_uses_the_percentile_window():
    rng = np.random.default_rng(0)
    values = rng.normal(3000, 200, size=(80, 80)).clip(0, 65535).astype(np.uint16)
    values[0, 0] = 65535  # one hot pixel must not set the contrast
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "PNG")
    from stage1_extract.decoding.image import to_rgb

    got = gray(np.asarray(to_rgb(Image.open(io.BytesIO(buf.getvalue())))))
    lo, hi = np.percentile(values.astype(np.float64), [0.5, 99.5])
    want = np.rint(np.clip((values - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    assert np.abs(got.astype(int) - want).max() <= 1
    assert got.std() > 40  # a plain /257 scaling would leave this image a flat dark grey


def test_voi_lut_sequence_by_hand():
    from pydicom.dataset import Dataset

    ds = dataset("MR_small.dcm")
    del ds.WindowCenter, ds.WindowWidth
    first, n = 100, 2048
    lut = (np.sqrt(np.arange(n)) * 90).astype(np.uint16)  # a non-linear VOI LUT, 12-bit output
    item = Dataset()
    item.LUTDescriptor = [n, first, 12]
    item.add_new("LUTData", "US", lut.tolist())  # US: 16-bit values
    ds.VOILUTSequence = [item]
    x = stored_values(ds).astype(int)
    out = lut[np.clip(x - first, 0, n - 1)].astype(np.float64)
    want = np.rint((out - lut.min()) / (lut.max() - lut.min()) * 255).astype(np.uint8)
    got = gray(dicom_pixels(to_bytes(ds)))
    assert np.abs(got.astype(int) - want).max() <= 1


def test_enhanced_multi_frame_functional_groups():
    """Enhanced CT/MR keep rescale and window in functional groups, not at the top level: same result."""
    from pydicom.dataset import Dataset

    ds = dataset("CT_small.dcm")
    ds.WindowCenter, ds.WindowWidth = 40, 400
    flat = dicom_pixels(to_bytes(ds))
    transform, voi, shared = Dataset(), Dataset(), Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = ds.RescaleSlope, ds.RescaleIntercept
    voi.WindowCenter, voi.WindowWidth = 40, 400
    shared.PixelValueTransformationSequence = [transform]
    shared.FrameVOILUTSequence = [voi]
    for key in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        del ds[key]
    assert not np.array_equal(dicom_pixels(to_bytes(ds)), flat)  # without the groups: another picture
    ds.SharedFunctionalGroupsSequence = [shared]
    assert np.array_equal(dicom_pixels(to_bytes(ds)), flat)


def test_padding_is_left_out_of_the_percentile_window():
    ds = dataset("CT_small.dcm")
    stored = np.frombuffer(ds.PixelData, "<i2").reshape(ds.Rows, ds.Columns).copy()
    stored[:40, :] = -2000  # a third of the image is padding outside the scan's field of view
    ds.PixelData = stored.tobytes()
    ds.PixelPaddingValue = -2000
    values = stored.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    lo, hi = np.percentile(values[stored != -2000], [0.5, 99.5])
    want = np.rint(np.clip((values - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    got = gray(dicom_pixels(to_bytes(ds)))
    assert np.abs(got.astype(int) - want).max() <= 1
