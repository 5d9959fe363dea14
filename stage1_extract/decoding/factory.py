"""Which decoder feeds the engine: ``decode="cpu"`` (PIL in worker processes) or ``"gpu"`` (the GPU's JPEG
decoders), made here so that the engines only ask for "a decoder" and never choose one themselves.

Every decoder is a context manager whose ``run(paths)`` yields :class:`~stage1_extract.decoding.batches.Batch`
objects; the modules of the decoders are imported only when one is made (torch, nvImageCodec are heavy).
Where no worker process can be started (a sandbox that forbids them, no interpreter to run), the CPU decoder
is :class:`InProcessDecoder`, the same decoding in the caller's process, said once in a warning.
"""

from __future__ import annotations

import logging
import time

from stage1_extract.errors import OptionError  # nothing heavier: the CLI imports this for --decode's choices

log = logging.getLogger(__name__)

#: decode → (decoder, device). torch-cpu / nvimgcodec-cpu: a GPU decoder's code on the CPU, for checking it.
DECODERS = {"cpu": ("pool", None), "gpu": ("gpu", "cuda"), "torch-cpu": ("torch", "cpu"),
            "nvimgcodec-cpu": ("nvimgcodec", "cpu")}
_warned = False


def check_decode(decode: str) -> None:
    """Refuse an unknown ``decode`` before any work is done."""
    if decode not in DECODERS:
        raise OptionError(f"decode must be one of {sorted(DECODERS)}, not {decode!r}")


class InProcessDecoder:
    """The decode pool's work done in this process, one batch at a time: for a handful of images (no worker to
    start) and where no process can be started. A file that crashes the decoder crashes the caller here."""

    def __init__(self, prep, *, batch_size: int, draft: bool = False) -> None:
        self.prep, self.batch_size, self.draft = prep, max(1, batch_size), draft

    def run(self, paths):
        import numpy as np

        from stage1_extract.decoding.batches import Batch, ItemResult
        from stage1_extract.decoding.image import decode_file

        size = self.prep.input_size
        for start in range(0, len(paths), self.batch_size):
            chunk = paths[start:start + self.batch_size]
            rows = np.empty((len(chunk), size, size, 3), np.uint8)  # fresh: a yielded batch stays valid
            items, n_ok, t0 = [], 0, time.perf_counter()
            for k, path in enumerate(chunk):
                got = decode_file(path, self.prep, rows[n_ok], draft=self.draft)
                ok = got.reason is None
                items.append(ItemResult(start + k, n_ok if ok else -1, got.reason, got.content_id, got.file_size,
                                        got.mtime_ns, False if ok else got.transient))
                n_ok += ok
            yield Batch(slot=0, pixels=rows[:n_ok], items=items, decode_seconds=time.perf_counter() - t0)

    def worker_pids(self) -> list[int]:
        return []

    def close(self) -> None:
        pass

    def __enter__(self) -> "InProcessDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_decoder(decode: str, prep, batch_size: int, workers: int, draft: bool):
    """The batch source: PIL in worker processes (cpu; in this process where none can start), nvImageCodec's
    hardware JPEG decoder (gpu, falling back to torchvision's nvJPEG when the ``[gpu-decode]`` extra is
    missing), or a GPU decoder on the CPU."""
    global _warned
    kind, device = DECODERS[decode]
    if kind == "pool":
        from stage1_extract.decoding import pool

        try:
            return pool.DecodePool(prep, batch_size=batch_size, workers=workers, draft=draft)
        except pool.WorkersUnavailableError as exc:
            if not _warned:
                log.warning("%s: decoding in this process instead (slower: one core, and a file that crashes "
                            "the decoder stops the run)", exc)
                _warned = True
            return InProcessDecoder(prep, batch_size=batch_size, draft=draft)
    if kind in ("gpu", "nvimgcodec"):
        from stage1_extract.decoding.nvimgcodec import NvImageCodecDecoder, nvimgcodec_available

        if kind == "nvimgcodec" or nvimgcodec_available():
            return NvImageCodecDecoder(prep, batch_size=batch_size, device=device, io_threads=max(2, workers))
        log.warning("--decode gpu: nvImageCodec is not installed, so JPEGs are decoded by torchvision's nvJPEG "
                    "(no hardware decoder, slower); pip install 'hybrid-transfer[gpu-decode]'")
    from stage1_extract.decoding.torch_decoder import TorchDecoder

    return TorchDecoder(prep, batch_size=batch_size, device=device, io_threads=max(2, workers))
