"""Shared test helpers: real photographs (from scikit-image) written as small image trees, and a tiny ONNX model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = {
    "cat": ["chelsea", "cat"],
    "coffee": ["coffee"],
    "space": ["astronaut", "rocket"],
}


def photo(name: str) -> Image.Image:
    from skimage import data

    arr = getattr(data, name)()
    return Image.fromarray(arr).convert("RGB")


def make_image_tree(root: Path, per_class: int = 4, size: int = 96, classes=("cat", "coffee", "space")) -> Path:
    """A class-folder tree of real photos: crops and flips of scikit-image's bundled photographs, as JPEG."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for label in classes:
        (root / label).mkdir(exist_ok=True)
        sources = [photo(n) for n in PHOTOS[label]]
        for i in range(per_class):
            img = sources[i % len(sources)]
            w, h = img.size
            cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            crop = img.crop((x, y, x + cw, y + ch)).resize((size, int(size * ch / cw) or 1))
            if i % 2:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop.save(root / label / f"{label}_{i:03d}.jpg", quality=90)
    return root


def make_tiny_onnx(path: Path, input_size: int = 32, channels: int = 8, seed: int = 0) -> Path:
    """A small random conv net (N×3×S×S → N×C×S/2×S/2) for fast mechanics tests; not a pretrained model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, size=(channels, 3, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, size=(channels,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, input_size, input_size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, input_size // 2, input_size // 2])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path
