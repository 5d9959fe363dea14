"""Stage 1: a pretrained ImageNet backbone, exported to ONNX and run with ONNX Runtime, turns images into
pooled feature vectors stored as Parquet shards (format: ``docs/shard-format.md``).

Public API::

    from stage1_extract import extract, list_backbones
    summary = extract("images/", "features/", backbone="efficientnet_lite0")
    print(summary.format())
"""

from stage1_extract.model.registry import DEFAULT_BACKBONE, WeightsUnavailableError, get_backbone, list_backbones
from stage1_extract.model.deploy import Pixels, find_model, load_pixels
from stage1_extract.extract import ExtractSummary, StrictModeError, extract, prepare_model

__all__ = [
    "DEFAULT_BACKBONE",
    "ExtractSummary",
    "Pixels",
    "StrictModeError",
    "WeightsUnavailableError",
    "extract",
    "find_model",
    "get_backbone",
    "list_backbones",
    "load_pixels",
    "prepare_model",
]
