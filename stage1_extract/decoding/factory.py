"""Which decoder feeds the engine: ``decode="cpu"`` (PIL in worker processes) or ``"gpu"`` (the GPU's JPEG
decoders), made here so that the engines only ask for "a decoder" and never choose one themselves.

Every decoder is a context manager whose ``run(paths)`` yields :class:`~stage1_extract.decoding.batches.Batch`
objects; the modules of the decoders are imported only when one is made (torch, nvImageCodec are heavy).
"""

from __future__ import annotations

import logging

from stage1_extract.errors import OptionError

log = logging.getLogger(__name__)

#: decode → (decoder, device). torch-cpu / nvimgcodec-cpu: a GPU decoder's code on the CPU, for checking it.
DECODERS = {"cpu": ("pool", None), "gpu": ("gpu", "cuda"), "torch-cpu": ("torch", "cpu"),
            "nvimgcodec-cpu": ("nvimgcodec", "cpu")}


def check_decode(decode: str) -> None:
    """Refuse an unknown ``decode`` before any work is done."""
    if decode not in DECODERS:
        raise OptionError(f"decode must be one of {sorted(DECODERS)}, not {decode!r}")


def make_decoder(decode: str, prep, batch_size: int, workers: int, draft: bool):
    """The batch source: PIL in worker processes (cpu), nvImageCodec's hardware JPEG decoder (gpu, falling
    back to torchvision's nvJPEG when the ``[gpu-decode]`` extra is missing), or a GPU decoder on the CPU."""
    kind, device = DECODERS[decode]
    if kind == "pool":
        from stage1_extract.decoding import pool

        return pool.DecodePool(prep, batch_size=batch_size, workers=workers, draft=draft)
    if kind in ("gpu", "nvimgcodec"):
        from stage1_extract.decoding.nvimgcodec import NvImageCodecDecoder, nvimgcodec_available

        if kind == "nvimgcodec" or nvimgcodec_available():
            return NvImageCodecDecoder(prep, batch_size=batch_size, device=device, io_threads=max(2, workers))
        log.warning("--decode gpu: nvImageCodec is not installed, so JPEGs are decoded by torchvision's nvJPEG "
                    "(no hardware decoder, slower); pip install 'hybrid-transfer[gpu-decode]'")
    from stage1_extract.decoding.torch_decoder import TorchDecoder

    return TorchDecoder(prep, batch_size=batch_size, device=device, io_threads=max(2, workers))
