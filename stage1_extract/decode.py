"""Image decoding: file bytes → RGB uint8 array, resized and centre-cropped as the backbone expects.

Imported by decode worker processes, so it must stay light (numpy and PIL only, no torch).
Every failure becomes a :class:`DecodeError` with a reason a person can read; the caller records it.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stage1_extract.preprocessing import Preprocessing

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
MAX_FILE_BYTES = 512 * 1024 * 1024


class DecodeError(Exception):
    """An image file that cannot be used; ``str(exc)`` is the reason recorded in the errors table."""


def content_id(data: bytes) -> str:
    """Identity of a file's content for incremental runs: size plus a 128-bit BLAKE2b digest."""
    return f"{len(data)}-{hashlib.blake2b(data, digest_size=16).hexdigest()}"


def read_file(path: str) -> bytes:
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise DecodeError(f"file is {size / 2**20:.0f} MiB, over the {MAX_FILE_BYTES // 2**20} MiB limit")
        with open(path, "rb") as fh:
            return fh.read()
    except DecodeError:
        raise
    except IsADirectoryError:
        raise DecodeError("is a directory") from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except OSError as exc:
        raise DecodeError(f"cannot read file: {exc.strerror or exc}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: transparency over white, 16/32-bit and float rescaled, CMYK via PIL."""
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
        arr = np.asarray(img)
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float64)
            finite = arr[np.isfinite(arr)]
            # ±inf → the extreme finite values (nan_to_num's ±1.8e308 would squash the stretch below to black)
            top, bottom = (float(finite.max()), float(finite.min())) if finite.size else (0.0, 0.0)
            arr = np.nan_to_num(arr, nan=0.0, posinf=top, neginf=bottom)
            scaled = np.clip(arr, 0, 255) if arr.max(initial=0) <= 255 and arr.min(initial=0) >= 0 else None
            if scaled is None:  # arbitrary float range: stretch to 0..255
                lo, hi = float(arr.min()), float(arr.max())
                scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        elif arr.max(initial=0) > 255 or arr.min(initial=0) < 0 or mode.startswith("I;16"):
            # 16-bit data (PNG/TIFF "I;16" or "I"): the windowing policy DICOM uses (robust percentile window)
            from stage1_extract.windowing import auto_window_uint8

            scaled = auto_window_uint8(arr)
        else:  # 8-bit-range data in a wide mode is kept as it is
            scaled = arr
        gray = Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    return img.convert("RGB")


def _crop_box(width: int, height: int, prep: Preprocessing) -> tuple[float, float, float, float]:
    """Source-pixel box that, resized to input_size², equals resize-shorter-side (rounded) then centre crop.

    The per-axis scale and the crop offset are the textbook pipeline's (see ``reference_preprocess``),
    so the result matches it pixel for pixel while resampling only the pixels that survive the crop.
    """
    scale = prep.resize / min(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    left = int(round((new_w - prep.input_size) / 2))
    top = int(round((new_h - prep.input_size) / 2))
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + prep.input_size) * sx, (top + prep.input_size) * sy)


def decode_image(data: bytes, prep: Preprocessing, *, draft: bool = False, frame: int | None = None) -> np.ndarray:
    """Decode ``data`` into an ``input_size × input_size × 3`` uint8 RGB array.

    EXIF orientation is applied; animated images use their first frame. Only the region that survives
    the centre crop is resampled (PIL's ``box``), so a 10000×10 strip costs no more than a thumbnail.
    ``draft`` lets the JPEG decoder skip detail (DCT scaling) when the image is at least twice the
    size needed — much faster for large photographs, at a small change in pixels.
    DICOM (recognised by content) is read by :mod:`stage1_extract.dicom`; ``frame`` picks a multi-frame
    file's frame (0-based; default the first).
    """
    from stage1_extract.dicom import dicom_image, is_dicom

    if not data:
        raise DecodeError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = dicom_image(data, frame) if is_dicom(data[:132]) else Image.open(io.BytesIO(data))
            if draft and img.format == "JPEG":
                w, h = img.size
                need = prep.resize / min(w, h)
                if need <= 0.5:
                    img.draft("RGB", (max(1, int(w * need * 1.001) + 1), max(1, int(h * need * 1.001) + 1)))
            img.seek(0)
            img = ImageOps.exif_transpose(img)
            img = to_rgb(img)
            w, h = img.size
            if w < 1 or h < 1:
                raise DecodeError(f"image has no pixels ({w}×{h})")
            out = img.resize(
                (prep.input_size, prep.input_size),
                resample=_RESAMPLE[prep.interpolation],
                box=_crop_box(w, h, prep),
            )
            arr = np.asarray(out, dtype=np.uint8)
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
            raise DecodeError("out of memory while decoding") from None
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
