"""DICOM decoding: file bytes → one frame as 8-bit RGB, the way a radiologist's viewer would show it.

pydicom parses the file and decodes the pixel data (compressed transfer syntaxes through the pylibjpeg
plugins, or GDCM when that is installed instead: pydicom picks whichever is there). Then, for grayscale,
the Modality LUT (rescale slope/intercept or a LUT), the VOI LUT or window the file states, else a robust
percentile window (see :mod:`stage1_extract.decoding.windowing`), and MONOCHROME1 inverted; PALETTE COLOR through
its palette, YBR to RGB, planar configuration undone. The caller resizes and crops as for any image.

Privacy: a reason this module gives (it reaches the errors table) never quotes a value from the file;
pydicom's own warnings and log records are silenced while it reads, since they can quote element values.
pydicom is imported only when a DICOM file is met, so this module is cheap to import.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import stat
import threading
import warnings

import numpy as np

from stage1_extract.decoding.files import DecodeError, frame_ref, split_frame_ref  # noqa: F401  (frame paths)
from stage1_extract.decoding.windowing import percentile_window, range_unit, unit_to_uint8, window_unit

DICOM_EXTENSIONS = {".dcm", ".dicom", ".dic"}
_VRS = {vr.encode() for vr in ("AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC "
                                "UI UL UN UR US UT UV").split()}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Elements whose values could identify someone or quote free text: scrubbed from any reason we pass on.
_TEXT_VRS = {"PN", "LO", "SH", "DA", "DT", "TM", "UI", "LT", "ST", "UT", "AS", "UC", "AE"}


class DicomError(DecodeError):
    """A DICOM file that cannot be used; ``str(exc)`` is a readable reason free of patient data."""


def is_dicom(head: bytes) -> bool:
    """Whether bytes are DICOM: the Part 10 ``DICM`` prefix at offset 128, or a bare dataset (no file
    header, as old ACR-NEMA exports are) that opens with a group-0008 element in either byte order."""
    if head[128:132] == b"DICM":
        return True
    if len(head) < 12:
        return False
    if head[:3] == b"\x00\x08\x00":  # big endian: always explicit VR
        return head[4:6] in _VRS
    if head[:2] != b"\x08\x00" or head[3] != 0:
        return False
    if head[4:6] in _VRS:  # explicit VR little endian
        return True
    # implicit VR: a 32-bit length, then the value; group 0008 opens with its 4-byte group length or with text
    # (SpecificCharacterSet, ImageType…). Binary headers that share the first bytes (a TGA's) fail this.
    length = int.from_bytes(head[4:8], "little")
    if head[2] == 0:
        return length == 4
    value = head[8:8 + min(length, len(head) - 8)]
    return 0 < length <= 1024 and len(value) > 0 and all(32 <= b < 127 for b in value)


def read_head(path: str, size: int) -> bytes:
    """A regular file's first ``size`` bytes; OSError for anything else (a FIFO must not block the listing)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        return fh.read(size)


def is_dicom_file(path: str) -> bool:
    """:func:`is_dicom` on a file's first bytes (False when it cannot be read: the decoder will say why)."""
    try:
        return is_dicom(read_head(path, 132))
    except OSError:
        return False


class _MuteWhileReading(logging.Filter):
    """Drops pydicom's log records in threads that are reading a file (they can quote element values)."""

    state = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.state, "depth", 0)


_MUTE = _MuteWhileReading()
_READERS = [0]  # reads in progress, in every thread: the filter is on pydicom's logger only while one is
_READERS_LOCK = threading.Lock()


@contextlib.contextmanager
def quiet_pydicom():
    """pydicom without warnings or log records (both can carry patient data) for the duration.

    The log filter is on pydicom's logger only while a read is in progress (installed by the first reader,
    removed by the last), so a program that also uses pydicom keeps its log once stage 1 is done; it drops only
    the records of the reading threads.
    """
    logger = logging.getLogger("pydicom")
    with _READERS_LOCK:
        if _READERS[0] == 0:
            logger.addFilter(_MUTE)
        _READERS[0] += 1
    _MUTE.state.depth = getattr(_MUTE.state, "depth", 0) + 1  # nested uses: quiet until the outermost ends
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _MUTE.state.depth -= 1
        with _READERS_LOCK:
            _READERS[0] -= 1
            if _READERS[0] == 0:
                logger.removeFilter(_MUTE)


def read_dataset(source, **options):
    """pydicom ``dcmread`` of bytes or a path, quietly; a bare dataset (no Part 10 header) is read with
    ``force`` and given the transfer syntax its encoding implies, which pixel decoding needs."""
    import pydicom
    from pydicom import uid

    fh = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    with quiet_pydicom():
        try:
            ds = pydicom.dcmread(fh, **options)
        except pydicom.errors.InvalidDicomError:
            if hasattr(fh, "seek"):
                fh.seek(0)
            ds = pydicom.dcmread(fh, force=True, **options)
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (uid.ImplicitVRLittleEndian if implicit else
                                          uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian)
    return ds


def scrub(text: str, ds) -> str:
    """``text`` with every textual value of ``ds`` (names, IDs, dates, UIDs, free text) replaced by '…'."""
    values = set()
    for elem in ds.iterall():
        if elem.VR in _TEXT_VRS and elem.value not in (None, ""):
            for v in (elem.value if elem.VM > 1 else [elem.value]):
                v = str(v).strip()
                if len(v) >= 2:
                    values.add(v)
    for v in sorted(values, key=len, reverse=True):
        text = text.replace(v, "…")
    return text


def _describe(ds) -> str:
    """What a pixel-less object is (SOP class and modality), for the reason."""
    sop = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")  # a DICOMDIR states it only there
    kind = getattr(sop, "name", None) or "DICOM object of no stated SOP class"
    modality = str(ds.get("Modality") or "").strip()
    return f"{kind}" + (f" (modality {modality})" if modality else "")


def _transfer_syntax(ds):
    ts = ds.file_meta.TransferSyntaxUID
    return ts, f"{ts.name} ({ts})" if ts.name != ts else str(ts)


def _check_decodable(ds) -> None:
    """Refuse, with a reason, what no decoder can give pixels for, before trying."""
    from pydicom.pixels import get_decoder

    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise DicomError(f"DICOM file has no pixel data: a {_describe(ds)}, not an image")
    ts, ts_text = _transfer_syntax(ds)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise DicomError(f"DICOM pixel data in transfer syntax {ts_text}, which no installed decoder handles") from None
    if not decoder.is_available:
        raise DicomError(f"DICOM pixel data in {ts_text} needs a decoder that is not installed: "
                         f"pip install 'hybrid-transfer[dicom]' (pylibjpeg plugins) or python-gdcm")
    for key in ("Rows", "Columns"):
        if not ds.get(key):
            raise DicomError(f"DICOM image has no {key} value")
    if not ts.is_encapsulated and "PixelData" in ds:
        bits = int(ds.get("BitsAllocated") or 0)
        per_frame = ds.Rows * ds.Columns * int(ds.get("SamplesPerPixel") or 1)
        frames = _frame_count(ds)
        expected = math.ceil(per_frame * frames * bits / 8)
        if str(ds.get("PhotometricInterpretation") or "").strip().upper() == "YBR_FULL_422":
            expected = expected * 2 // 3  # chroma stored at half horizontal resolution
        have = len(ds.PixelData)
        if have < expected:
            raise DicomError(f"DICOM pixel data is truncated: {have} bytes where {frames} frame(s) of "
                             f"{ds.Columns}×{ds.Rows} at {bits} bits need {expected}")


def _frame_count(ds) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def _frame_view(ds, index: int):
    """The tags that turn frame ``index``'s stored values into grey levels, as a flat dataset: the top level's,
    overridden by enhanced multi-frame functional groups (shared, then this frame's), where CT/MR keep them."""
    from pydicom.dataset import Dataset

    view = Dataset()
    keys = ("PhotometricInterpretation", "BitsStored", "PixelRepresentation", "RescaleSlope", "RescaleIntercept",
            "RescaleType", "ModalityLUTSequence", "VOILUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction")
    for key in keys:
        if key in ds:
            view[key] = ds[key]
    groups = []
    for seq_key in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(seq_key)
        if seq:
            item = seq[0] if seq_key.startswith("Shared") else (seq[index] if index < len(seq) else None)
            if item is not None:
                groups.append(item)
    for item in groups:
        for macro in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            if macro in item and item[macro].value:
                for elem in item[macro].value[0]:
                    if elem.keyword in keys:
                        view[elem.keyword] = elem
    return view


def _first_number(value) -> float | None:
    """A DS element's value, or the first of several (Window Center/Width may list alternative views)."""
    if value is None or isinstance(value, (str, bytes)) and not value.strip():
        return None
    if not isinstance(value, (str, bytes, float, int)):  # MultiValue
        value = value[0] if len(value) else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _gray_unit(stored: np.ndarray, ds, view) -> np.ndarray:
    """Stored values → 0..1 grey levels: Modality LUT, then VOI LUT, window, or the percentile window."""
    from pydicom.pixels import apply_modality_lut, apply_voi

    values = apply_modality_lut(stored, view) if ("RescaleSlope" in view or "ModalityLUTSequence" in view) else stored
    if view.get("VOILUTSequence"):
        item = view.VOILUTSequence[0]
        lut = np.asarray(item.LUTData, dtype=np.float64).reshape(-1)
        out = apply_voi(values, view, index=0)
        return range_unit(out, float(lut.min()), float(lut.max()))
    center, width = _first_number(view.get("WindowCenter")), _first_number(view.get("WindowWidth"))
    if center is not None and width is not None:
        try:
            return window_unit(values, center, width, str(view.get("VOILUTFunction") or "LINEAR"))
        except ValueError:
            pass  # a width the standard forbids: the stated window is unusable, use the image's own
    mask = None
    padding = ds.get("PixelPaddingValue")
    if isinstance(padding, int):
        limit = ds.get("PixelPaddingRangeLimit")
        lo, hi = (padding, padding) if not isinstance(limit, int) else sorted((padding, limit))
        mask = (stored < lo) | (stored > hi)
        if not mask.any():
            mask = None
    low, high = percentile_window(values, mask)
    return range_unit(values, low, high)


def _color_uint8(arr: np.ndarray, bits: int) -> np.ndarray:
    if arr.dtype == np.uint8 and bits <= 8:
        return arr
    top = float(2 ** max(1, bits) - 1)
    return np.rint(np.clip(arr.astype(np.float64), 0, top) * (255.0 / top)).astype(np.uint8)


def dicom_pixels(data: bytes, frame: int | None = None, *, max_pixels: int | None = None) -> np.ndarray:
    """One frame (0-based; default the first) of a DICOM file as an ``H × W × 3`` uint8 RGB array.

    Raises :class:`DicomError` with a readable, patient-data-free reason for anything unusable.
    """
    with quiet_pydicom():  # element values are converted lazily, anywhere below: keep pydicom quiet throughout
        return _pixels(data, frame, max_pixels)


def _pixels(data: bytes, frame: int | None, max_pixels: int | None) -> np.ndarray:
    try:
        import pydicom
        from pydicom.pixels import apply_color_lut, pixel_array
    except ImportError:
        raise DicomError("a DICOM file, and pydicom is not installed: pip install 'hybrid-transfer[dicom]'") from None
    index = 0 if frame is None else frame
    try:
        ds = read_dataset(data)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom on a damaged header can raise almost anything
        raise DicomError(f"not a readable DICOM file ({type(exc).__name__})") from None
    try:
        _check_decodable(ds)
        frames = _frame_count(ds)
        if index >= frames:
            raise DicomError(f"DICOM frame {index + 1} asked for; the file has {frames}")
        if max_pixels is not None and ds.Rows * ds.Columns > max_pixels:
            raise DicomError(f"DICOM frame of {ds.Columns}×{ds.Rows} pixels is over the {max_pixels} pixel limit")
        try:
            arr = pixel_array(ds, index=index)
        except (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError, TypeError, EOFError) as exc:
            _, ts_text = _transfer_syntax(ds)
            detail = scrub(" ".join(str(exc).split())[:240], ds) or type(exc).__name__
            raise DicomError(f"cannot decode the DICOM pixel data ({ts_text}): {detail}") from None
        photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
        if arr.ndim == 2 and photometric == "PALETTE COLOR":
            rgb = apply_color_lut(arr, ds)
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
            # 16-bit palette entries: the high byte is the 8-bit colour (65280 → 255, as viewers show it)
            return (rgb >> (bits - 8)).astype(np.uint8) if bits > 8 else rgb.astype(np.uint8)
        if arr.ndim == 3:  # RGB, or YBR that pydicom already converted to RGB (planar configuration undone)
            return _color_uint8(arr, int(ds.get("BitsStored") or 8))
        view = _frame_view(ds, index)
        unit = _gray_unit(arr, ds, view)
        gray = unit_to_uint8(unit, invert=photometric == "MONOCHROME1")
        return np.repeat(gray[..., None], 3, axis=2)
    except (DicomError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed element must cost this file only, with a safe reason
        detail = scrub(" ".join(str(exc).split())[:240], ds)
        raise DicomError(f"cannot use this DICOM file: {type(exc).__name__}: {detail}") from None


def dicom_image(data: bytes, frame: int | None = None):
    """:func:`dicom_pixels` as a PIL RGB image, for the common resize-and-crop path in ``decode``."""
    from PIL import Image

    return Image.fromarray(dicom_pixels(data, frame, max_pixels=Image.MAX_IMAGE_PIXELS))
