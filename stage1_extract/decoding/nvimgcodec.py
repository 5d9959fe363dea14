"""JPEG decoding on the GPU's hardware decoder (nvImageCodec), resized and cropped on the device.

On a GPU machine PIL on the CPU cores is the wall of stage 1, and torchvision's nvJPEG (CUDA kernels, no
hardware decoder) is slower still than 16 PIL processes (``shared/reference``: 3,662 against 5,239 img/s on
~500×375 photos). The A100/H100/H200 carry a hardware JPEG decoder; nvImageCodec (PyPI
``nvidia-nvimgcodec-cu13``, the ``[gpu-decode]`` extra) drives it, batched, and falls back by itself to its
CUDA and hybrid nvJPEG back ends for what the hardware cannot do (progressive JPEGs among them).

Each batch: files are read by threads (two batches ahead); the JPEGs go to one batched ``decode`` call on
the device; every decoded image is resized (shorter side, antialiased) and centre-cropped on the device
into a ``batch_size``-row buffer that ONNX Runtime reads through IO binding — no host round trip. Files that
are not plain 1- or 3-channel JPEGs, that the decoder refuses, or whose shape is extreme (too thin, or
over PIL's decompression-bomb limit) take the exact PIL path, in the reading threads, one file at a time;
unreadable files get the same reasons as with the worker-process pool, so the errors table is the same.

On a machine without a GPU the same code runs with nvImageCodec's CPU back end and torch's CPU device
(``--decode nvimgcodec-cpu``): that is how the tests exercise it.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np

from stage1_extract.decoding.files import DecodeError, read_ahead, read_image, split_frame_ref
from stage1_extract.decoding.image import decode_image, jpeg_scan_problem
from stage1_extract.decoding.batches import Batch, ItemResult
from stage1_extract.model.preprocessing import Preprocessing
from stage1_extract.decoding.torch_decoder import MAX_ASPECT, resize_crop_float
from stage1_extract.errors import Stage1Error

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'hybrid-transfer[gpu-decode]' (nvidia-nvimgcodec-cu13 and nvidia-nvjpeg)"


class GpuDecodeUnavailableError(Stage1Error, RuntimeError):
    """nvImageCodec is not installed, or cannot reach the GPU."""


def nvimgcodec_available() -> bool:
    """Whether the ``[gpu-decode]`` extra is installed (importable; the GPU itself is checked on use)."""
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.nvimgcodec") is not None
    except (ImportError, ValueError):
        return False


def _preload_nvjpeg() -> None:
    """Load libnvjpeg from the ``nvidia-nvjpeg`` wheel, where nvImageCodec's loader (which looks only on the
    system's library path) would not find it; without it only the CPU back end registers."""
    import ctypes
    import glob

    try:
        import nvidia
    except ImportError:
        return
    for root in getattr(nvidia, "__path__", []):
        for lib in sorted(glob.glob(os.path.join(root, "cu13", "lib", "libnvjpeg.so.*"))
                          + glob.glob(os.path.join(root, "nvjpeg", "lib", "libnvjpeg.so.*"))):
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
                return
            except OSError as exc:
                log.debug("could not load %s: %s", lib, exc)


def _import_nvimgcodec():
    # Its C++ logger prints every parse error of a damaged file; those files go to PIL, which names the fault.
    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
    _preload_nvjpeg()
    import sys
    import tempfile

    # On import it also prints (from C, on fd 2) a line for every optional codec library that is absent
    # (JPEG 2000, TIFF): none of them is used here, so that text goes to the debug log instead.
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            nvimgcodec = importlib.import_module("nvidia.nvimgcodec")
        except ImportError as exc:
            raise GpuDecodeUnavailableError(f"GPU JPEG decoding needs nvImageCodec ({exc}): {INSTALL_HINT}") from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace").strip()
            if text:
                log.debug("nvImageCodec on import: %s", text)
    return nvimgcodec


def read_file(path: str) -> tuple:
    """(bytes or None, error reason, size, mtime_ns, content id, transient, DICOM frame) through
    :func:`stage1_extract.decoding.files.read_image`: the CPU pool's size limit, FIFO guard and reasons. The content
    id is hashed here, in the reading threads, not on the thread feeding the GPU."""
    got = read_image(path)
    return got.data, got.reason, got.file_size, got.mtime_ns, got.content_id, got.transient, \
        split_frame_ref(path)[1]


def _pil_decode(data: bytes, prep: Preprocessing, frame: int | None = None) -> tuple[np.ndarray | None, str | None]:
    """The exact CPU path for one file (DICOM, other formats, what the device refused): (pixels, None) or
    (None, reason)."""
    try:
        return decode_image(data, prep, frame=frame), None
    except DecodeError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - a decoder bug costs one image, never the run
        return None, f"unexpected decoder error: {type(exc).__name__}: {exc}"


class NvImageCodecDecoder:
    """``for batch in NvImageCodecDecoder(prep, batch_size=…).run(paths)`` — the DecodePool interface.

    ``device="cuda"``: the hardware decoder (then nvJPEG's CUDA/hybrid back ends), pixels stay on the GPU
    (``batch.pixels`` is a CUDA tensor, valid until the next batch is asked for). ``device="cpu"``: the same
    code on nvImageCodec's CPU back end, ``batch.pixels`` a numpy array.
    """

    def __init__(self, prep: Preprocessing, *, batch_size: int, device: str = "cuda", io_threads: int = 8,
                 device_id: int = 0) -> None:
        import torch

        nvimgcodec = _import_nvimgcodec()
        self.torch, self.nvimgcodec = torch, nvimgcodec
        self.prep, self.batch_size = prep, batch_size
        on_gpu = device.startswith("cuda")
        if on_gpu and not torch.cuda.is_available():
            raise GpuDecodeUnavailableError("--decode gpu needs a CUDA GPU visible to torch; use --decode cpu")
        self.device = torch.device("cuda", device_id) if on_gpu else torch.device("cpu")
        kinds = nvimgcodec.BackendKind
        try:
            if on_gpu:
                # No CPU back end here: what the GPU refuses goes to PIL, the reference decoder, instead.
                backends = [nvimgcodec.Backend(k) for k in (kinds.HW_GPU_ONLY, kinds.GPU_ONLY, kinds.HYBRID_CPU_GPU)]
                self._decoder = nvimgcodec.Decoder(device_id=device_id, backends=backends)
            else:
                self._decoder = nvimgcodec.Decoder(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                                                   backends=[nvimgcodec.Backend(kinds.CPU_ONLY)])
        except RuntimeError as exc:
            raise GpuDecodeUnavailableError(f"nvImageCodec cannot start a decoder on {self.device}: {exc}; "
                                            f"{INSTALL_HINT}") from None
        self._params = nvimgcodec.DecodeParams(apply_exif_orientation=True, color_spec=nvimgcodec.ColorSpec.SRGB)
        from PIL import Image

        # PIL refuses more than twice its MAX_IMAGE_PIXELS as a bomb: such files go to PIL to be refused alike.
        self._max_pixels = 2 * (Image.MAX_IMAGE_PIXELS or 1 << 62)
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="read")
        shape = (batch_size, prep.input_size, prep.input_size, 3)
        self._out = torch.empty(shape, dtype=torch.uint8, device=self.device)
        # resized images gather here and are rounded to uint8 once per batch: fewer kernels per image
        self._out_float = torch.empty(shape, dtype=torch.float32, device=self.device)
        self.pixels_on_device = on_gpu
        self._warned = False

    def _code_stream(self, data: bytes):
        """nvImageCodec's view of a file when the device should decode it, else None (PIL's turn)."""
        if data[:3] != b"\xff\xd8\xff" or jpeg_scan_problem(data) is not None:  # PIL records why it is no image
            return None
        try:  # the header is parsed lazily, on the first attribute read
            cs = self.nvimgcodec.CodeStream(data)
            w, h, codec, channels = cs.width, cs.height, cs.codec_name, cs.num_channels
        except RuntimeError:  # a damaged header: PIL names what is wrong with the file
            return None
        if codec != "jpeg" or channels not in (1, 3) or w < 1 or h < 1:
            return None  # CMYK/YCCK JPEGs: PIL's conversion is the reference
        if max(w, h) / min(w, h) > MAX_ASPECT or w * h > self._max_pixels:
            return None
        return cs

    def _to_tensor(self, image):
        """A decoded nvImageCodec image (H×W×3) as a (3, H, W) torch view on our device."""
        if self.pixels_on_device:  # zero-copy views of the decoder's device buffers (DLPack)
            t = self.torch.from_dlpack(image)
        else:
            t = self.torch.from_numpy(np.asarray(image))
        return t.permute(2, 0, 1)

    def _decode_on_device(self, streams: list) -> list:
        """Decode a batch of code streams; None where the decoder refused a file."""
        if not streams:
            return []
        stream = self.torch.cuda.current_stream(self.device).cuda_stream if self.pixels_on_device else 0
        try:
            return list(self._decoder.decode(streams, params=self._params, cuda_stream=stream))
        except RuntimeError as exc:  # the whole call failed: leave every file to PIL
            log.debug("batched device decode failed (%s); PIL decodes these %d files", exc, len(streams))
            return [None] * len(streams)

    def _batch(self, chunk: list[int], results: list) -> Batch:
        torch = self.torch
        t0 = time.perf_counter()
        streams = {k: self._code_stream(data) for k, (data, reason, *_) in enumerate(results) if reason is None}
        # what the device will not take goes to PIL in the reading threads, while the device decodes the rest
        pil = self._pil_jobs([k for k, cs in streams.items() if cs is None], results)
        on_device = [k for k, cs in streams.items() if cs is not None]
        images = dict(zip(on_device, self._decode_on_device([streams[k] for k in on_device])))
        refused = self._pil_jobs([k for k in on_device if images[k] is None or images[k].shape[2] != 3], results)
        pil.update(refused)
        self._warn_if_all_refused(len(on_device), len(refused))
        items, row = [], 0
        for k, index in enumerate(chunk):
            data, reason, size, mtime, cid, transient, _ = results[k]  # transient: a reading failure only
            if reason is None:
                image = images.get(k)
                try:
                    if k not in pil:
                        self._out_float[row] = resize_crop_float(self._to_tensor(image), self.prep)
                    else:
                        pixels, reason = pil[k].result()
                        if reason is None:
                            self._out_float[row] = torch.from_numpy(pixels).to(self.device, non_blocking=True)
                except Exception as exc:  # noqa: BLE001 - one file, never the run
                    reason = f"unexpected decoder error: {type(exc).__name__}: {exc}"
            items.append(ItemResult(index, row if reason is None else -1, reason, cid, size, mtime,
                                    transient=transient and reason is not None))
            if reason is None:
                row += 1
        self._out[:row] = self._out_float[:row].round_().clamp_(0, 255)  # whole numbers in 0..255: exact
        pixels = self._out[:row] if self.pixels_on_device else self._out[:row].numpy()
        return Batch(slot=0, pixels=pixels, items=items, decode_seconds=time.perf_counter() - t0)

    def _warn_if_all_refused(self, offered: int, refused: int) -> None:
        """Say so (once) when the device decodes none of a batch's JPEGs: the output is still right (PIL
        decodes them), but slow — typically nvJPEG's library is missing and only the CPU could register."""
        if offered >= 8 and refused == offered and not self._warned:
            self._warned = True
            log.warning("the GPU decoder refused all %d JPEGs of a batch; PIL decodes them instead (slower). "
                        "Is nvJPEG installed? %s", offered, INSTALL_HINT)

    def _pil_jobs(self, rows: list[int], results: list) -> dict:
        return {k: self._io.submit(_pil_decode, results[k][0], self.prep, results[k][6]) for k in rows}

    def run(self, paths: Sequence[str]) -> Iterator[Batch]:
        for chunk, results in read_ahead(self._io, read_file, paths, self.batch_size):
            # The batch's pixels are written on the current CUDA stream; a consumer on another stream
            # orders itself after them (OverlappedInference does), so there is no synchronisation here.
            yield self._batch(chunk, results)

    def close(self) -> None:
        self._io.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "NvImageCodecDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
