"""How pixels become model input: resize, centre crop, normalisation (driven by the backbone spec)."""

from __future__ import annotations

import dataclasses
from typing import Any

from stage1_extract.errors import OptionError


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to ``resize``, centre-crop ``input_size`` square, then ``(x - mean) / std``.

    ``mean``/``std`` are on the 0–255 pixel scale, per RGB channel. Normalisation runs inside the ONNX
    graph (the model takes uint8 NHWC), so decode workers only resize and crop.
    """

    input_size: int
    resize: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485 * 255, 0.456 * 255, 0.406 * 255)
    std: tuple[float, float, float] = (0.229 * 255, 0.224 * 255, 0.225 * 255)

    def __post_init__(self) -> None:
        if self.interpolation not in ("bilinear", "bicubic", "nearest", "lanczos"):
            raise OptionError(f"unknown interpolation {self.interpolation!r}")
        if self.resize < self.input_size:
            raise OptionError(f"resize ({self.resize}) must be at least input_size ({self.input_size})")

    @classmethod
    def from_fractions(cls, input_size: int, resize: int, interpolation: str, mean, std) -> "Preprocessing":
        """Build from mean/std given on the 0–1 scale (torchvision and timm convention)."""
        return cls(
            input_size=int(input_size),
            resize=int(resize),
            interpolation=interpolation,
            mean=tuple(round(float(m) * 255, 6) for m in mean),
            std=tuple(round(float(s) * 255, 6) for s in std),
        )

    def at_size(self, input_size: int | None, resize: int | None = None) -> "Preprocessing":
        """This preprocessing at another input size (a backbone fine-tuned at a lower resolution is used at that
        resolution); the resize keeps this crop ratio unless given."""
        if input_size is None or (int(input_size) == self.input_size and resize in (None, self.resize)):
            return self
        size = int(input_size)
        if size < 32:
            raise OptionError(f"--input-size {size}: too small for an ImageNet CNN (use at least 32)")
        return dataclasses.replace(self, input_size=size,
                                   resize=int(resize or round(size * self.resize / self.input_size)))

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The part of a ``width``×``height`` image the model sees, in its pixels: (left, top, right, bottom)
        after the shorter side is resized to ``resize`` (rounded) and ``input_size`` is centre-cropped."""
        scale = self.resize / min(width, height)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        left = int(round((new_w - self.input_size) / 2))
        top = int(round((new_h - self.input_size) / 2))
        sx, sy = width / new_w, height / new_h
        return (left * sx, top * sy, (left + self.input_size) * sx, (top + self.input_size) * sy)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "resize": self.resize,
            "crop": "center",
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        return cls(
            input_size=int(d["input_size"]),
            resize=int(d["resize"]),
            interpolation=d.get("interpolation", "bilinear"),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
        )
