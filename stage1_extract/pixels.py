"""Pixels exactly as stage 1 feeds its model, for deployment: :func:`load_pixels` imports no torch, Keras or ONNX.

This is stage 1's own decoding (:mod:`stage1_extract.decoding`: EXIF orientation, every PIL mode, 16-bit and
float images windowed to 8 bits, DICOM with its VOI LUT or window, the shorter side resized and centre-cropped
as the preprocessing says), not a copy of it: a deployed model (``stage2-classify export``'s ONNX file, whose
``metadata_props['preprocessing']`` is the dict to pass) sees the very pixels training saw. What it needs is
the ``deploy`` extra: numpy, Pillow, pydicom and its JPEG plugins, and onnxruntime to run the model::

    import json, onnxruntime as ort
    from stage1_extract.pixels import load_pixels

    sess = ort.InferenceSession("model.onnx")
    prep = json.loads(sess.get_modelmeta().custom_metadata_map["preprocessing"])
    pixels = load_pixels(["scan.dcm", "photo.png"], prep)        # .array: N×S×S×3 uint8, .errors
    probabilities, ood_score = sess.run(None, {"images": pixels.array})
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from stage1_extract.decoding.dicom import is_dicom_file  # noqa: F401  (public: is this file DICOM?)
from stage1_extract.errors import OptionError
from stage1_extract.model.preprocessing import Preprocessing

FILE_LIST_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet")  # a file with one of these is a list of images


@dataclasses.dataclass
class Pixels:
    """Decoded, resized and centre-cropped images: ``array`` holds one N×S×S×3 uint8 row per path in ``paths``."""

    array: np.ndarray
    paths: list[str]
    errors: list[tuple[str, str]]  # (path, reason) for files that could not be used


def as_preprocessing(preprocessing: Preprocessing | dict) -> Preprocessing:
    """A :class:`Preprocessing` from itself or its dict (a run's ``shard_metadata.json``, an exported model's
    ``metadata_props['preprocessing']``); a crop other than the centre one stage 1 makes is refused."""
    if isinstance(preprocessing, Preprocessing):
        return preprocessing
    crop = preprocessing.get("crop", "center")
    if crop != "center":
        raise OptionError(f"preprocessing crop {crop!r}: stage 1 only makes centre crops ('center')")
    return Preprocessing.from_dict(preprocessing)


def image_paths(images, *, limit: int | None = None) -> list[str]:
    """The files ``images`` names: one image file, a folder or file list (listed as :func:`extract` lists them),
    or a list of paths (as given). ``limit`` keeps that many, spread evenly over the listing."""
    if isinstance(images, (list, tuple)):
        paths = [os.fspath(p) for p in images]
    elif os.path.isfile(images) and os.path.splitext(os.fspath(images))[1].lower() not in FILE_LIST_SUFFIXES:
        paths = [os.fspath(images)]  # any other file is one image (DICOM files are often named by UID)
    else:
        from stage1_extract.inputs.listing import list_images

        paths = [r.abspath for r in list_images(images).records]
    if limit is not None and len(paths) > limit:
        paths = [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, limit).round().astype(int))]
    return paths


def load_pixels(images, preprocessing: Preprocessing | dict, *, limit: int | None = None) -> Pixels:
    """Decode images the way extraction does; unusable files are listed in ``errors``, not raised.

    ``images``: one image file (a DICOM file without an extension too), a folder or file list, or a list of
    paths; ``preprocessing``: a :class:`Preprocessing` or its dict. ``limit`` keeps that many images.
    """
    from stage1_extract.decoding.files import DecodeError, read_file, split_frame_ref
    from stage1_extract.decoding.image import decode_image

    prep = as_preprocessing(preprocessing)
    rows, ok, errors = [], [], []
    for path in image_paths(images, limit=limit):
        try:  # "scan.dcm#frame=3": that frame of a multi-frame DICOM, as stage 1 extracted it
            rows.append(decode_image(read_file(path), prep, frame=split_frame_ref(os.fspath(path))[1]))
            ok.append(path)
        except DecodeError as exc:
            errors.append((path, str(exc)))
    size = prep.input_size
    array = np.stack(rows) if rows else np.zeros((0, size, size, 3), np.uint8)
    return Pixels(array, ok, errors)
