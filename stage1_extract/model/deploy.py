"""What a deployed model needs of stage 1: the extractor that made a run's vectors, and its pixels.

``find_model`` gives back the verified ONNX extractor behind a shard metadata record (the one a stage-2
run keeps in ``shard_metadata.json``): from the export cache when the exact file is still there (matched by
its ``onnx_sha256``), otherwise exported again and accepted only when it makes compatible vectors (same
backbone, weights, preprocessing and dimension). ``load_pixels`` (:mod:`stage1_extract.pixels`, light enough for
a deployment machine) decodes image files exactly as extraction does, so a merged pixels-to-probabilities
model can be compared with the two-stage path on the very same input.
"""

from __future__ import annotations

import json
import os

import numpy as np

from shardformat import IncompatibleShardsError, ShardMetadata
from stage1_extract.model.export import ExtractorModel, cache_dir, prepare_model, with_feature_map
from stage1_extract.model.preprocessing import Preprocessing
from stage1_extract.errors import InputNotFoundError, OptionError
from stage1_extract.pixels import Pixels, load_pixels  # noqa: F401  (stage 1's public names, kept here too)


def _as_metadata(metadata: ShardMetadata | str | dict) -> ShardMetadata:
    if isinstance(metadata, ShardMetadata):
        return metadata
    return ShardMetadata.from_json(metadata if isinstance(metadata, str) else json.dumps(metadata))


def _from_cache(meta: ShardMetadata) -> ExtractorModel | None:
    """The cached export whose bytes are exactly the ones that made ``meta``'s vectors, if still cached."""
    from stage1_extract.model.weights import file_sha256

    for info_path in sorted(cache_dir().glob("*.json")):
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError):
            continue
        onnx_path = info_path.with_suffix(".onnx")
        if not isinstance(info, dict) or info.get("onnx_sha256") != meta.onnx_sha256 or not onnx_path.is_file():
            continue
        if file_sha256(onnx_path) != meta.onnx_sha256:  # damaged or replaced since: export again
            continue
        return ExtractorModel(backbone=meta.backbone, weights_id=meta.weights_id, onnx_path=str(onnx_path),
                              onnx_sha256=meta.onnx_sha256, preprocessing=Preprocessing.from_dict(meta.preprocessing),
                              feature_dim=meta.feature_dim, precision=meta.precision)
    return None


def find_model(metadata: ShardMetadata | str | dict, *, weights: str | os.PathLike | None = None,
               onnx: str | os.PathLike | None = None, precision: str | None = None,
               feature_map: bool = False) -> ExtractorModel:
    """The ONNX extractor (uint8 ``images`` N×S×S×3 in, float32 ``features`` N×D out) behind ``metadata``.

    ``precision`` defaults to the one the vectors were made with. A run trained on a user ONNX model needs
    that file again (``onnx=``) unless its wrapped export is still cached; a run trained with ``--weights``
    needs the same weights file when the export must be rebuilt. Raises
    :class:`~shardformat.IncompatibleShardsError` when what can be built would make different vectors.
    ``feature_map``: the extractor's separate variant that also outputs ``feature_map`` (N×D×h×w, the last
    convolutional map that ``features`` averages), for heatmaps; its vectors are checked the same way.
    """
    meta = _as_metadata(metadata)
    precision = precision or meta.precision
    if precision == meta.precision and onnx is None:
        cached = _from_cache(meta)
        if cached is not None and not feature_map:
            return cached
        if cached is not None and meta.backbone.startswith("onnx:"):  # its map, from the cached export itself
            return with_feature_map(cached)
    from stage1_extract.run.lifecycle import shard_metadata

    prep = Preprocessing.from_dict(meta.preprocessing)
    if meta.backbone.startswith("onnx:"):
        if precision != meta.precision:
            raise OptionError(f"the vectors were made by a user ONNX model ({meta.backbone}, {meta.precision}); "
                             f"stage 1 cannot convert it to {precision}: export it in that precision yourself")
        if onnx is None:
            raise InputNotFoundError(
                f"the vectors were made by a user ONNX model ({meta.backbone}) whose wrapped export is no longer "
                f"in {cache_dir()}; pass the same ONNX file (onnx=... / --onnx FILE)")
        model = prepare_model(onnx=onnx, input_size=prep.input_size, resize=prep.resize,
                              interpolation=prep.interpolation, mean=tuple(m / 255 for m in prep.mean),
                              std=tuple(s / 255 for s in prep.std), feature_map=feature_map)
    elif meta.provenance.get("kind") == "finetuned":
        model = _finetuned_model(meta, weights, precision, feature_map)
    else:
        model = prepare_model(meta.backbone, weights=weights, precision=precision, input_size=prep.input_size,
                              resize=prep.resize, feature_map=feature_map)
    made = shard_metadata(model)
    if made.compatibility_key() != meta.compatibility_key():
        hint = " (the run was trained with --weights: pass the same file)" if meta.weights_id != made.weights_id \
            and weights is None else ""
        raise IncompatibleShardsError(
            f"the extractor available now ({made.describe()}) does not make the vectors this model was trained on "
            f"({meta.describe()}){hint}")
    return model


def _finetuned_model(meta: ShardMetadata, weights, precision: str, feature_map: bool = False) -> ExtractorModel:
    """A fine-tuned backbone's extractor: from the run directory it was written to (``weights=``: that directory,
    its ``finetune.json`` or its ``backbone.safetensors``, when the run was moved)."""
    from stage1_extract.model.finetuned import FINETUNE_FILE

    where = weights if weights is not None else meta.provenance.get("directory")
    if where is None:
        raise InputNotFoundError("the vectors were made by a fine-tuned backbone whose run directory is unknown; "
                                 "pass it (weights=RUN_DIR / --weights RUN_DIR)")
    where = os.fspath(where)
    if os.path.isfile(where) and not where.endswith(FINETUNE_FILE):
        where = os.path.dirname(where)
    return prepare_model(backbone_from=where, precision=precision, feature_map=feature_map)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """One image file as stage 1 decodes it before resizing: H×W×3 uint8 RGB, EXIF orientation applied,
    DICOM and 16-bit images through the same window the model sees (``scan.dcm#frame=3`` for a frame).

    For showing an image (overlays, thumbnails); :meth:`Preprocessing.crop_box` says which part of it the
    model saw. Raises ``stage1_extract.Stage1Error`` (a decode error) with the reason when it cannot be used.
    """
    import io
    import warnings

    from PIL import Image, ImageOps

    from stage1_extract.decoding.dicom import dicom_image, is_dicom
    from stage1_extract.decoding.files import DecodeError, read_file, split_frame_ref
    from stage1_extract.decoding.image import check_memory_budget, to_rgb

    file, frame = split_frame_ref(os.fspath(path))
    data = read_file(file)
    if not data:
        raise DecodeError(f"{file}: empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = dicom_image(data, frame) if is_dicom(data[:132]) else Image.open(io.BytesIO(data))
            img.seek(0)
            check_memory_budget(img.mode, *img.size)
            img = to_rgb(ImageOps.exif_transpose(img))
            return np.asarray(img, dtype=np.uint8)
        except DecodeError:
            raise
        except Exception as exc:  # any undecodable file: the reason, never a crash
            raise DecodeError(f"{file}: cannot decode image: {exc or type(exc).__name__}") from None
