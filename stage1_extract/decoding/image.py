"""Image decoding: file bytes → RGB uint8 array, resized and centre-cropped as the backbone expects.

Imported by decode worker processes, so it must stay light (numpy and PIL only, no torch).
Every failure becomes a :class:`~stage1_extract.decoding.files.DecodeError` with a reason a person can read;
the caller records it. Files are read by :mod:`stage1_extract.decoding.files`; :func:`decode_file` is the one
read-and-decode step of the CPU decoders (worker pool and Ray).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from stage1_extract.decoding.files import DecodeError, FileResult, read_image, split_frame_ref
from stage1_extract.model.preprocessing import Preprocessing

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
#: Peak memory one image may take to decode (estimated from its size and pixel mode before any pixel is
#: decoded); larger images are recorded with the reason. Override with STAGE1_DECODE_MEMORY_MB.
MEMORY_BUDGET_BYTES = int(os.environ.get("STAGE1_DECODE_MEMORY_MB", "1024")) * 2**20


def decode_file(path: str, prep: Preprocessing, out: np.ndarray, *, draft: bool = False) -> FileResult:
    """Read and decode ``path`` into ``out`` (an ``input_size² × 3`` uint8 array); the failure, if any, in
    the result (``data`` is dropped: only identity and reason travel back from a decode worker)."""
    got = read_image(path)
    got.data, data = None, got.data
    if got.reason is not None:
        return got
    try:
        out[...] = decode_image(data, prep, draft=draft, frame=split_frame_ref(path)[1])
    except DecodeError as exc:
        got.reason, got.transient = str(exc), exc.transient
    except MemoryError:
        got.reason, got.transient = "out of memory while decoding (transient: retried next run)", True
    except Exception as exc:  # a decoder bug must cost one image, not the run
        got.reason = f"unexpected decoder error: {type(exc).__name__}: {exc}"
    return got


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: transparency over white, 16/32-bit and float rescaled, CMYK via PIL."""
    img = _to_8bit(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    """RGB for colour modes; L (gray, rescaled) for 16/32-bit and float modes, whose RGB is the gray repeated.

    Returning L lets :func:`decode_image` resize first and expand to RGB after, so a huge gray image never
    exists as full-size RGB (4 bytes a pixel).
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _wide_to_gray(img)
    return img.convert("RGB")


_BAND_PIXELS = 1 << 20  # pixels converted at a time: wide modes never get a full-size float64 copy


def _bands(img: Image.Image):
    """(top row, pixel array) of horizontal bands of ``img``, each about ``_BAND_PIXELS`` pixels."""
    w, h = img.size
    step = max(1, _BAND_PIXELS // max(1, w))
    for top in range(0, h, step):
        yield top, np.asarray(img.crop((0, top, w, min(h, top + step))))


def _wide_to_gray(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float gray → 8-bit gray, band by band (exactly the whole-image arithmetic, at a
    fraction of the memory: a float TIFF of a few hundred KB can hold a raster of hundreds of MB).

    Float: NaN → 0, ±inf → the extreme finite values; data within 0..1 is on the 0..1 scale, data within
    0..255 is kept, any other range is stretched to 0..255 (:func:`~stage1_extract.decoding.windowing.float_scale`). Integer: 16-bit data (``I;16``, or ``I`` outside 0..255) gets the robust percentile
    window of :mod:`stage1_extract.decoding.windowing` (the DICOM fallback); 8-bit-range data is kept.
    """
    from stage1_extract.decoding.windowing import float_scale

    mode = img.mode
    w, h = img.size
    gray = np.empty((h, w), np.uint8)
    if mode == "F":
        lo = hi = None  # finite extremes
        has_nan = False
        for _, band in _bands(img):
            finite = np.isfinite(band)
            has_nan = has_nan or bool(np.isnan(band).any())
            if finite.any():
                vals = band[finite]
                lo = float(vals.min()) if lo is None else min(lo, float(vals.min()))
                hi = float(vals.max()) if hi is None else max(hi, float(vals.max()))
        top, bottom = (hi, lo) if hi is not None else (0.0, 0.0)
        # the range after NaN → 0 and ±inf → extremes
        amin, amax = (min(bottom, 0.0), max(top, 0.0)) if has_nan else (bottom, top)
        if hi is None:
            amin = amax = 0.0
        black, white = float_scale(amin, amax)  # 0..1 and 0..255 are scales (conventions), other ranges stretched
        for row, band in _bands(img):
            arr = np.nan_to_num(band.astype(np.float64), nan=0.0, posinf=top, neginf=bottom)
            if white > black:
                scaled = np.clip((arr - black) * (255.0 / (white - black)), 0, 255)
            else:
                scaled = np.zeros_like(arr)
            gray[row:row + len(band)] = np.rint(scaled).astype(np.uint8)
    else:
        peak = max((int(band.max(initial=0)) for _, band in _bands(img)), default=0)
        floor = min((int(band.min(initial=0)) for _, band in _bands(img)), default=0)
        if peak > 255 or floor < 0 or mode.startswith("I;16"):
            # 16-bit data (PNG/TIFF "I;16" or "I"): the windowing policy DICOM uses (a robust percentile window,
            # stage1_extract.decoding.windowing), its percentiles taken from the same strided sample as on a whole image
            from stage1_extract.decoding.windowing import percentile_window, range_unit, unit_to_uint8, window_sample

            low, high = percentile_window(np.concatenate(
                [window_sample(band, start=row * w, total=w * h) for row, band in _bands(img)]))
            for row, band in _bands(img):
                gray[row:row + len(band)] = unit_to_uint8(range_unit(band, low, high))
        else:  # 8-bit-range data in a wide mode is kept as it is
            for row, band in _bands(img):
                gray[row:row + len(band)] = band.astype(np.uint8)
    return Image.fromarray(gray, mode="L")


# Peak bytes per pixel to decode an image of each mode here: its raster plus the conversions above.
_PEAK_BYTES_PER_PIXEL = {"1": 5, "L": 5, "P": 17, "PA": 17, "LA": 17, "La": 17, "RGBA": 16, "RGBa": 16,
                         "F": 5, "I": 5, "RGB": 8}


def check_memory_budget(mode: str, width: int, height: int) -> None:
    """Refuse, before decoding a pixel, an image whose decoding would take more than the per-image budget."""
    per_pixel = 3 if mode.startswith("I;16") else _PEAK_BYTES_PER_PIXEL.get(mode, 8)
    need = width * height * per_pixel
    if need > MEMORY_BUDGET_BYTES:
        raise DecodeError(
            f"image is {width}×{height} {mode}: decoding needs about {need / 2**20:.0f} MiB, over the "
            f"{MEMORY_BUDGET_BYTES // 2**20} MiB per-image memory budget (STAGE1_DECODE_MEMORY_MB)"
        )


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start of frame; C4 DHT, C8 JPG, CC DAC
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # the first marker after entropy-coded data


def jpeg_scan_problem(data: bytes) -> str | None:
    """Why a JPEG's first scan cannot hold its image, or None (also for non-JPEG data and what the decoder must
    judge itself). libjpeg turns a scan without data into a uniform grey image and only warns, which PIL does
    not pass on: a header-only file (a 9000×9000 header, no pixels) would be extracted as if it were a picture.

    A scan with no entropy-coded bytes holds nothing. A baseline (Huffman, sequential) scan codes at least two
    bits per 8×8 block (a DC code and an end-of-block code), so fewer bytes than that cannot be the image.
    """
    if data[:2] != b"\xff\xd8":
        return None
    i, n, frame = 2, len(data), None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None  # not a marker where one must be: the decoder reports it
        marker = data[i + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:
            i += 1 if marker == 0xFF else 2
            continue
        if marker == 0xD9:
            return "no image data: the JPEG ends before its first scan (a header only)"
        length = int.from_bytes(data[i + 2:i + 4], "big")
        segment = data[i + 4:i + 2 + length]
        if marker in _SOF_MARKERS and len(segment) >= 6:
            comps = {segment[6 + 3 * c]: (segment[7 + 3 * c] >> 4, segment[7 + 3 * c] & 15)
                     for c in range(segment[5]) if 7 + 3 * c < len(segment)}
            frame = (marker, int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big"), comps)
        if marker == 0xDA:
            start = i + 2 + length
            end = _SCAN_END.search(data, start)
            got = (end.start() if end else n) - start
            if got <= 0:
                return "no image data: the JPEG's scan holds no pixels (a header only)"
            need = _baseline_minimum_bytes(frame, [segment[1 + 2 * c] for c in range(segment[0] if segment else 0)])
            if got < need:
                return (f"truncated image data: the first scan holds {got} bytes, a {frame[2]}×{frame[1]} baseline "
                        f"JPEG needs at least {need}")
            return None
        i += 2 + length
    return None


def _baseline_minimum_bytes(frame, scan_components: list[int]) -> int:
    """Fewest bytes a baseline Huffman scan of these components can take (2 bits per block), 0 if unknown."""
    if frame is None or frame[0] not in (0xC0, 0xC1):
        return 0
    _, height, width, comps = frame
    if not comps or not all(c in comps for c in scan_components) or height == 0:
        return 0
    hmax, vmax = max(h for h, _ in comps.values()) or 1, max(v for _, v in comps.values()) or 1
    if len(scan_components) == 1:
        h, v = comps[scan_components[0]]
        blocks = _ceil(_ceil(width * h, hmax), 8) * _ceil(_ceil(height * v, vmax), 8)
    else:
        mcus = _ceil(width, 8 * hmax) * _ceil(height, 8 * vmax)
        blocks = mcus * sum(h * v for c, (h, v) in comps.items() if c in scan_components)
    return blocks * 2 // 8


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


_TRUNCATED_FLAG = threading.Lock()


@contextlib.contextmanager
def _truncated_images_refused():
    """PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` off while decoding: a caller's notebook may have turned it on,
    and then a cut-off file decodes to a picture padded with grey instead of an error. Set back afterwards."""
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    with _TRUNCATED_FLAG:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = True


def decode_image(data: bytes, prep: Preprocessing, *, draft: bool = False, frame: int | None = None) -> np.ndarray:
    """Decode ``data`` into an ``input_size × input_size × 3`` uint8 RGB array.

    EXIF orientation is applied; animated images use their first frame. Only the region that survives
    the centre crop is resampled (PIL's ``box``), so a 10000×10 strip costs no more than a thumbnail.
    ``draft`` lets the JPEG decoder skip detail (DCT scaling) when the image is at least twice the
    size needed — much faster for large photographs, at a small change in pixels.
    DICOM (recognised by content) is read by :mod:`stage1_extract.decoding.dicom`; ``frame`` picks a multi-frame
    file's frame (0-based; default the first).
    """
    from stage1_extract.decoding.dicom import dicom_image, is_dicom

    if not data:
        raise DecodeError("empty file (0 bytes)")
    problem = jpeg_scan_problem(data)
    if problem:
        raise DecodeError(problem)
    with warnings.catch_warnings(), _truncated_images_refused():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = dicom_image(data, frame) if is_dicom(data[:132]) else Image.open(io.BytesIO(data))
            if draft and img.format == "JPEG":
                w, h = img.size
                need = prep.resize / min(w, h)
                if need <= 0.5:
                    img.draft("RGB", (max(1, int(w * need * 1.001) + 1), max(1, int(h * need * 1.001) + 1)))
            img.seek(0)
            check_memory_budget(img.mode, *img.size)
            ImageOps.exif_transpose(img, in_place=True)  # in place: no second full-size raster
            img = _to_8bit(img)
            w, h = img.size
            if w < 1 or h < 1:
                raise DecodeError(f"image has no pixels ({w}×{h})")
            out = img.resize(
                (prep.input_size, prep.input_size),
                resample=_RESAMPLE[prep.interpolation],
                box=prep.crop_box(w, h),  # the textbook resize-then-crop's box, resampling only what survives
            )
            arr = np.asarray(out if out.mode == "RGB" else out.convert("RGB"), dtype=np.uint8)
        except DecodeError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise DecodeError(f"decompression bomb refused: {exc}") from None
        except UnidentifiedImageError:
            raise DecodeError("not an image PIL can identify") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
            text = str(exc) or type(exc).__name__
            raise DecodeError(f"cannot decode image: {text}") from None
        except MemoryError:
            raise DecodeError("out of memory while decoding (transient: retried next run)", transient=True) from None
    if arr.shape != (prep.input_size, prep.input_size, 3):
        raise DecodeError(f"decoded to unexpected shape {arr.shape}")
    return arr


def reference_preprocess(path: str, prep: Preprocessing) -> np.ndarray:
    """The textbook pipeline (resize the shorter side, round, then crop), for tests comparing against it."""
    img = to_rgb(ImageOps.exif_transpose(Image.open(path)))
    w, h = img.size
    scale = prep.resize / min(w, h)
    img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample=_RESAMPLE[prep.interpolation])
    w, h = img.size
    left, top = int(round((w - prep.input_size) / 2)), int(round((h - prep.input_size) / 2))
    return np.asarray(img.crop((left, top, left + prep.input_size, top + prep.input_size)), dtype=np.uint8)
