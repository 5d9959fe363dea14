"""What every decoder yields, whichever it is (worker pool, torchvision/nvJPEG, nvImageCodec): batches of pixels
with one result per image, so the engine's loop never needs to know which decoder it runs."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class ItemResult:
    index: int  # position in the caller's list of images
    row: int  # row in the batch's pixels, or -1 on error
    reason: str | None
    content_id: str | None
    file_size: int
    mtime_ns: int
    transient: bool = False  # not the file's fault (out of memory, I/O error, killed worker): retry next run


@dataclasses.dataclass
class Batch:
    slot: int
    pixels: np.ndarray  # view of the slot: (n_ok, S, S, 3) uint8, valid until the next batch is asked for
    items: list[ItemResult]
    decode_seconds: float
