"""Stage 1: a pretrained ImageNet backbone, exported to ONNX and run with ONNX Runtime, turns images into
pooled feature vectors stored as Parquet shards (format: ``docs/shard-format.md``).

Public API::

    from stage1_extract import extract, list_backbones
    summary = extract("images/", "features/", backbone="efficientnet_lite0")        # engine="ray" for a cluster
    print(summary.format())

Layout (``docs/architecture.md``): ``model/`` (registry, weights, export, ONNX graph), ``inputs/`` (listing,
DICOM records), ``decoding/`` (file reading, PIL/DICOM decoding, the worker pool, GPU decoders), ``runtime/``
(ONNX Runtime session, overlapped inference), ``run/`` (lifecycle, plan, writer, lock, signals), ``engines/``
(one runner; local and Ray). The names below are imported on first use, so ``import stage1_extract`` (and
``stage1-extract --help``) loads neither numpy nor onnxruntime.
"""

import importlib

_PUBLIC = {
    "extract": "stage1_extract.api",
    "extract_ray": "stage1_extract.api",
    "prepare_model": "stage1_extract.api",
    "ExtractSummary": "stage1_extract.api",
    "StrictModeError": "stage1_extract.api",
    "ExtractOptions": "stage1_extract.options",
    "Stage1Error": "stage1_extract.errors",
    "DEFAULT_BACKBONE": "stage1_extract.model.registry",
    "get_backbone": "stage1_extract.model.registry",
    "list_backbones": "stage1_extract.model.registry",
    "WeightsUnavailableError": "stage1_extract.model.weights",
    "Pixels": "stage1_extract.pixels",
    "find_model": "stage1_extract.model.deploy",
    "load_pixels": "stage1_extract.pixels",
    "is_dicom_file": "stage1_extract.pixels",
    "content_id": "stage1_extract.decoding.files",
    "split_frame_ref": "stage1_extract.decoding.files",
    "compile_group_regex": "stage1_extract.inputs.groups",
    "TorchBackbone": "stage1_extract.model.finetuned",
    "torch_backbone": "stage1_extract.model.finetuned",
    "read_finetuned": "stage1_extract.model.finetuned",
    "write_finetuned": "stage1_extract.model.finetuned",
    "finetune_info_for": "stage1_extract.model.finetuned",
    "load_image": "stage1_extract.model.deploy",
    "Preprocessing": "stage1_extract.model.preprocessing",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'stage1_extract' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # once: later lookups (and monkeypatching) see a plain attribute
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
