"""JPEG decoding with torchvision (nvJPEG on a GPU) and resizing on the same device.

On a GPU machine PIL on the CPU cores is the wall of stage 1 (see ``shared/reference``); this decoder
moves JPEG decoding and resizing onto the GPU, where the decoded batch stays for inference (ONNX
Runtime reads it through IO binding, no copy back). Files that are not baseline JPEGs, that nvJPEG
rejects, or whose shape is extreme, fall back to the exact PIL path, so every file gets the same
treatment it would get from the CPU decoder, only faster. On a machine without a GPU the same code runs
on the CPU device (that is how the tests exercise it).

It yields the same :class:`~stage1_extract.decoding.pool.Batch` objects as the worker-process pool.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence


from stage1_extract.decoding.files import DecodeError, read_ahead, read_image, split_frame_ref
from stage1_extract.decoding.image import decode_image
from stage1_extract.decoding.batches import Batch, ItemResult
from stage1_extract.model.preprocessing import Preprocessing

MAX_ASPECT = 8.0  # beyond this, resizing the whole image first costs too much memory: use PIL's box path


def _is_jpeg(data: bytes) -> bool:
    """A JPEG the device should decode; a header-only one goes to PIL, which records why it is no image."""
    from stage1_extract.decoding.image import jpeg_scan_problem

    return data[:3] == b"\xff\xd8\xff" and jpeg_scan_problem(data) is None


def resize_crop(img, prep: Preprocessing):
    """(3, H, W) uint8 tensor → (S, S, 3) uint8 on the same device: shorter side to ``resize`` (rounded),
    centre crop, antialiased — the PIL decoder's geometry (``Preprocessing.crop_box``)."""
    import torch

    return resize_crop_float(img, prep).round_().clamp_(0, 255).to(torch.uint8)


def resize_crop_float(img, prep: Preprocessing):
    """:func:`resize_crop` before rounding: (S, S, 3) float32, so a batch can be rounded in one go."""
    import torch

    p = prep
    _, h, w = img.shape
    scale = p.resize / min(w, h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    mode = "bicubic" if p.interpolation in ("bicubic", "lanczos") else (
        "nearest" if p.interpolation == "nearest" else "bilinear")
    x = img.unsqueeze(0).float()
    x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode=mode,
                                        antialias=mode != "nearest",
                                        align_corners=False if mode != "nearest" else None)
    left = int(round((new_w - p.input_size) / 2))
    top = int(round((new_h - p.input_size) / 2))
    return x[0, :, top:top + p.input_size, left:left + p.input_size].permute(1, 2, 0)


class TorchDecoder:
    """``for batch in TorchDecoder(prep, batch_size=…, device="cuda").run(paths)`` — like DecodePool."""

    def __init__(self, prep: Preprocessing, *, batch_size: int, device: str = "cuda", io_threads: int = 8) -> None:
        import torch

        self.torch = torch
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("--decode gpu needs a CUDA GPU visible to torch; use the default CPU decoding")
        self.prep = prep
        self.batch_size = batch_size
        self.device = torch.device(device)
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="read")
        self._out = torch.empty((batch_size, prep.input_size, prep.input_size, 3), dtype=torch.uint8,
                                device=self.device)
        self.pixels_on_device = self.device.type == "cuda"

    def _resize_crop(self, img):
        return resize_crop(img, self.prep)

    def _decode_batch(self, blobs: list[bytes]) -> list:
        """Decode JPEG blobs on the device; entries that fail come back as None (PIL fallback)."""
        torch = self.torch
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True))
        except RuntimeError:  # one bad file spoils a batched call: retry one by one
            out = []
            for t in tensors:
                try:
                    out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True))
                except RuntimeError:
                    out.append(None)
            return out

    def run(self, paths: Sequence[str]) -> Iterator[Batch]:
        torch = self.torch
        # file reading (decode.read_image: size limit, FIFOs, transient errors) runs in threads, overlapping decode
        for chunk, results in read_ahead(self._io, read_image, paths, self.batch_size):
            t0 = time.perf_counter()
            items: list[ItemResult] = []
            jpeg_rows = [k for k, got in enumerate(results) if got.data and _is_jpeg(got.data)]
            decoded = dict(zip(jpeg_rows, self._decode_batch([results[k].data for k in jpeg_rows]))) if jpeg_rows else {}
            row = 0
            for k, index in enumerate(chunk):
                got = results[k]
                data, reason, transient = got.data, got.reason, got.transient
                results[k] = None  # the file's bytes are not needed past this image
                if reason is None:
                    img = decoded.get(k)
                    try:
                        if img is not None and max(img.shape[1:]) / max(1, min(img.shape[1:])) <= MAX_ASPECT:
                            self._out[row] = self._resize_crop(img)
                        else:
                            frame = split_frame_ref(paths[index])[1]  # DICOM and other non-JPEGs: the CPU path
                            self._out[row] = torch.from_numpy(decode_image(data, self.prep, frame=frame).copy()).to(
                                self.device)
                    except DecodeError as exc:
                        reason, transient = str(exc), exc.transient
                    except MemoryError:
                        reason, transient = "out of memory while decoding (transient: retried next run)", True
                    except Exception as exc:  # noqa: BLE001 - one file, never the run
                        reason = f"unexpected decoder error: {type(exc).__name__}: {exc}"
                items.append(ItemResult(index, row if reason is None else -1, reason, got.content_id,
                                        got.file_size, got.mtime_ns, transient))
                if reason is None:
                    row += 1
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            pixels = self._out[:row] if self.pixels_on_device else self._out[:row].numpy()
            yield Batch(slot=0, pixels=pixels, items=items, decode_seconds=time.perf_counter() - t0)

    def close(self) -> None:
        self._io.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "TorchDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
