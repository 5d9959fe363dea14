"""Heatmap checks: real digits with a planted shortcut, and an independent autograd Grad-CAM to compare with.

``marked_digits`` writes scikit-learn's real handwritten digits (8×8, upscaled) as a class-folder tree in
which every image of one class carries a small white square near its top-left corner: a shortcut a
classifier will use, and that a heatmap must find. ``autograd_gradcam`` is Grad-CAM the textbook way
(torch autograd through the head, channel weights = spatial mean of the gradient), used as the reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MARKER = (8, 8, 17, 17)  # left, top, right, bottom in 64-pixel image coordinates (inside the centre crop)


def marked_digits(root: Path, classes=(0, 1, 2, 3), per_class: int = 20, marked: int = 3, size: int = 64,
                  skip: int = 0) -> Path:
    """``per_class`` digits of each class (those after the first ``skip`` of the class, so two calls with
    different ``skip`` are disjoint) as ``root/<digit>/<digit>_<index>.png``; class ``marked`` has the marker."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    scale = size / 64
    box = tuple(round(v * scale) for v in MARKER)
    for digit in classes:
        folder = root / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(digits.target == digit)[skip:skip + per_class]:
            pixels = (digits.images[i] * (255 / 16)).round().clip(0, 255).astype(np.uint8)
            image = np.asarray(Image.fromarray(pixels, "L").resize((size, size), Image.BICUBIC)).copy()
            if digit == marked:
                image[box[1]:box[3], box[0]:box[2]] = 255
            Image.fromarray(image, "L").save(folder / f"{digit}_{i}.png")
    return root


def on_marker(heatmap: np.ndarray, width: int, height: int, slack: float) -> bool:
    """Whether ``heatmap`` (over the whole image) peaks on the marker, grown by ``slack`` original pixels (the
    heatmap's own resolution: one feature-map cell)."""
    h, w = heatmap.shape
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    px, py = (x + 0.5) * width / w, (y + 0.5) * height / h
    scale = width / 64
    left, top, right, bottom = (v * scale for v in MARKER)
    return left - slack <= px <= right + slack and top - slack <= py <= bottom + slack


def torch_head(keras_model):
    """The Keras head rebuilt in torch from its layers' weights (logits out, no softmax)."""
    import keras
    import torch

    parts = []
    for layer in keras_model.layers:
        kind = type(layer).__name__
        if kind == "Normalization":
            mean = torch.tensor(np.asarray(keras.ops.convert_to_numpy(layer.mean)).reshape(-1), dtype=torch.float64)
            var = torch.tensor(np.asarray(keras.ops.convert_to_numpy(layer.variance)).reshape(-1),
                               dtype=torch.float64)
            std = torch.clamp(torch.sqrt(var), min=keras.config.epsilon())
            parts.append(lambda x, m=mean, s=std: (x - m) / s)
        elif kind == "Dense":
            k, b = (torch.tensor(np.asarray(w), dtype=torch.float64) for w in layer.get_weights())
            relu = keras.activations.serialize(layer.activation)
            relu = (relu if isinstance(relu, str) else relu.get("config", {}).get("name")) == "relu"
            parts.append(lambda x, k=k, b=b, r=relu: torch.relu(x @ k + b) if r else x @ k + b)

    def head(x):
        for part in parts:
            x = part(x)
        return x

    return head


def autograd_gradcam(feature_map_fn, head, pixels: np.ndarray, mean, std, target: np.ndarray) -> np.ndarray:
    """Grad-CAM by autograd: ``feature_map_fn`` (torch, normalised NCHW → N×D×h×w), ``head`` (pooled → logits);
    returns N×S×S heatmaps over the input crop (ReLU, ÷max, bilinear upsampling)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        a = feature_map_fn(x).double()
    a.requires_grad_(True)
    logits = head(a.mean(dim=(2, 3)))
    logits.gather(1, torch.as_tensor(target).view(-1, 1)).sum().backward()
    weights = a.grad.mean(dim=(2, 3))
    cam = torch.relu((weights[:, :, None, None] * a).sum(dim=1)).detach()
    cam = cam / cam.flatten(1).max(dim=1).values.clamp(min=1e-12)[:, None, None]
    size = pixels.shape[1]
    return F.interpolate(cam[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


def correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation per image of two N×S×S stacks; 1 where both maps are empty (nothing for the class)."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    empty = (np.abs(a).max(axis=1) < 1e-6) & (np.abs(b).max(axis=1) < 1e-6)
    a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    r = (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return np.where(empty, 1.0, r)
