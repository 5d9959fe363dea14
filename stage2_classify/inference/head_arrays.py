"""The Keras head as plain arrays (standardisation, dense kernels), its class scores and their gradient.

The gradient of a class score with respect to the pooled feature vector is what heatmaps weight the
backbone's channels by (:mod:`stage2_classify.inference.explain`); the arrays are what the merged ONNX file is
built from (:mod:`stage2_classify.inference.export`).
"""

from __future__ import annotations

import numpy as np

from stage2_classify.errors import ExportError


def head_layers(model) -> list[tuple[str, dict]]:
    """The Keras head as plain arrays: ("standardise", mean, std) then ("dense", kernel, bias, activation)…"""
    import keras

    steps = []
    for layer in model.layers:
        kind = type(layer).__name__
        if kind in ("InputLayer", "Dropout"):  # dropout does nothing at inference
            continue
        if kind == "Normalization":
            mean = keras.ops.convert_to_numpy(layer.mean).reshape(-1).astype(np.float64)
            var = keras.ops.convert_to_numpy(layer.variance).reshape(-1).astype(np.float64)
            # Keras divides by max(sqrt(variance), epsilon)
            steps.append(("standardise", {"mean": mean, "std": np.maximum(np.sqrt(var), keras.config.epsilon())}))
        elif kind == "Dense":
            activation = keras.activations.serialize(layer.activation)
            activation = activation if isinstance(activation, str) else activation.get("config", {}).get("name")
            if activation not in ("relu", "softmax", "linear"):
                raise ExportError(f"layer {layer.name}: activation {activation!r} has no ONNX conversion here")
            kernel, bias = (keras.ops.convert_to_numpy(w) for w in (layer.kernel, layer.bias))
            steps.append(("dense", {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32),
                                    "activation": activation}))
        else:
            raise ExportError(f"layer {layer.name} ({kind}) has no ONNX conversion; the head must be "
                              "Normalization → Dense/Dropout layers")
    if not steps or steps[-1][0] != "dense" or steps[-1][1]["activation"] != "softmax":
        raise ExportError("the head must end in a softmax Dense layer")
    return steps


def head_is_linear(steps) -> bool:
    return sum(1 for kind, _ in steps if kind == "dense") == 1


def logits_and_masks(steps, features: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The class scores before the softmax (N×C) and each hidden layer's ReLU mask, in float64."""
    h = np.asarray(features, np.float64)
    masks = []
    for kind, p in steps:
        if kind == "standardise":
            h = (h - p["mean"]) / p["std"]
            continue
        pre = h @ p["kernel"].astype(np.float64) + p["bias"].astype(np.float64)
        if p["activation"] == "relu":
            masks.append(pre > 0)
            h = np.maximum(pre, 0.0)
        else:
            h = pre
    return h, masks


def channel_weights(steps, features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``∂z_t/∂f`` for every row (N×D): the last kernel's column ``t``, back through the ReLU masks and kernels,
    times ``1/σ`` of the standardisation."""
    _, masks = logits_and_masks(steps, features)
    dense = [p for kind, p in steps if kind == "dense"]
    g = dense[-1]["kernel"].astype(np.float64).T[np.asarray(target)]  # N×H
    for p, mask in zip(reversed(dense[:-1]), reversed(masks)):
        g = (g * mask) @ p["kernel"].astype(np.float64).T
    for kind, p in steps:
        if kind == "standardise":
            g = g / p["std"]
    return g
