"""Windowing: 12/16-bit and float grayscale values → 8-bit, the one policy for DICOM and 16-bit PNG/TIFF.

A backbone sees 8-bit pixels, so wide-range data must be mapped to 0..255. How it is mapped decides
what the model can see: a plain min–max stretch of a CT (air at −1000, metal at +3000) leaves soft
tissue in a handful of grey levels, and one hot pixel in a 16-bit export squashes everything else to
black. The policy, in order:

1. the window the file states (DICOM VOI LUT, or Window Center/Width with its VOI LUT Function);
2. otherwise a robust percentile window: the 0.5th to 99.5th percentile of the image's own values
   (padding excluded), so a few outliers cannot set the contrast;

then MONOCHROME1 images (where a high value means dark) are inverted. Float images without a stated
window (TIFF, PNG-less formats) follow their own conventions first (:func:`float_scale`): values within 0..1
are on the 0..1 scale (1 is white), values within 0..255 are already 8-bit; only other ranges are stretched.
Imported by decode workers: numpy only.
"""

from __future__ import annotations

import math

import numpy as np

LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
_PERCENTILE_SAMPLE = 1 << 20  # percentiles of ~1M evenly strided pixels: same window, bounded cost on 60 MP scans


def window_unit(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM windowing (PS3.3 C.11.2.1.2 and C.11.2.1.3) onto 0..1 instead of the output bit range.

    ``LINEAR`` is the standard's default (centre − 0.5, width − 1), ``LINEAR_EXACT`` the plain ramp,
    ``SIGMOID`` the logistic curve. A width the standard forbids raises ``ValueError``.
    """
    x = np.asarray(values, dtype=np.float64)
    function = (function or "LINEAR").strip().upper()
    if function == "SIGMOID":
        if not width > 0:
            raise ValueError(f"window width {width} must be > 0 for SIGMOID")
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR":
        if not width >= 1:
            raise ValueError(f"window width {width} must be ≥ 1 for LINEAR")
        center, width = center - 0.5, width - 1.0
        if width == 0:  # width 1: a threshold at the centre
            return (x > center).astype(np.float64)
    elif function == "LINEAR_EXACT":
        if not width > 0:
            raise ValueError(f"window width {width} must be > 0 for LINEAR_EXACT")
    else:
        raise ValueError(f"unknown VOI LUT function {function!r} (expected LINEAR, LINEAR_EXACT or SIGMOID)")
    return np.clip((x - center) / width + 0.5, 0.0, 1.0)


def float_scale(low: float, high: float) -> tuple[float, float]:
    """The (black, white) values of a float image whose finite values lie in ``low``..``high``.

    Floats in 0..1 are the usual convention for float images (scikit-image, OpenCV, ImageJ exports): 0 is
    black and 1 white, so a dim image stays dim; reading them as 0..255 would make every image black. Data
    within 0..255 is 8-bit data stored as float. Anything else has no convention: its full range is shown.
    """
    if low >= 0 and high <= 1:
        return 0.0, 1.0
    if low >= 0 and high <= 255:
        return 0.0, 255.0
    return low, high


def window_sample(values: np.ndarray, *, start: int = 0, total: int | None = None) -> np.ndarray:
    """The pixels of ``values`` that :func:`percentile_window` samples from a whole image of ``total`` pixels
    when ``values`` is the part starting at flat index ``start`` (a band): concatenating the bands' samples
    gives exactly the whole image's sample, so banded decoding finds the same window."""
    x = np.asarray(values).reshape(-1)
    total = x.size if total is None else total
    if total <= _PERCENTILE_SAMPLE:
        return x
    step = total // _PERCENTILE_SAMPLE
    return x[(-start) % step::step]


def percentile_window(values: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """(low, high) = the 0.5th and 99.5th percentiles of the finite values (where ``mask`` is true)."""
    x = np.asarray(values)
    if mask is not None:
        x = x[mask]
    x = x.reshape(-1)
    if x.size > _PERCENTILE_SAMPLE:
        x = x[:: x.size // _PERCENTILE_SAMPLE]
    if x.dtype.kind == "f":
        x = x[np.isfinite(x)]
    if x.size == 0:
        return 0.0, 0.0
    low, high = np.percentile(x, [LOW_PERCENTILE, HIGH_PERCENTILE])
    low, high = float(low), float(high)
    if high <= low:  # most pixels share one value (e.g. a mask): fall back to the full range
        low, high = float(x.min()), float(x.max())
    return low, high


def range_unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Values mapped linearly so that ``low`` → 0 and ``high`` → 1, clipped; a flat image maps to 0."""
    x = np.asarray(values, dtype=np.float64)
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return np.zeros(x.shape, np.float64)
    x = np.nan_to_num(x, nan=low, posinf=high, neginf=low)
    return np.clip((x - low) / (high - low), 0.0, 1.0)


def unit_to_uint8(unit: np.ndarray, *, invert: bool = False) -> np.ndarray:
    """0..1 → 0..255 (rounded); ``invert`` for MONOCHROME1, where the lowest value is white."""
    if invert:
        unit = 1.0 - unit
    return np.rint(np.asarray(unit) * 255.0).astype(np.uint8)


def auto_window_uint8(values: np.ndarray, *, mask: np.ndarray | None = None, invert: bool = False) -> np.ndarray:
    """The fallback policy in one call: robust percentile window, then 8-bit (inverted for MONOCHROME1)."""
    low, high = percentile_window(values, mask)
    return unit_to_uint8(range_unit(values, low, high), invert=invert)
