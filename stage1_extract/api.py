"""Stage 1's front door: :func:`extract` (one function for every engine) and its Ray spelling :func:`extract_ray`.

The signature is written out so that ``help(extract)`` shows every option, but each default is
:class:`~stage1_extract.options.ExtractOptions`' (a dataclass field's class attribute is its default), so a
default exists once; ``tests/stage1/test_options.py`` keeps the two equal. The work is the runner's
(:mod:`stage1_extract.engines.runner`): list → plan → decode → ONNX Runtime → shards, with a summary.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from stage1_extract.engines.runner import run_extraction
from stage1_extract.model.export import prepare_model  # noqa: F401  (public: stage1_extract.prepare_model)
from stage1_extract.options import ExtractOptions as O
from stage1_extract.run.lifecycle import ExtractSummary, StrictModeError, shard_metadata  # noqa: F401  (public)

if TYPE_CHECKING:
    from stage1_extract.runtime.session import CudaOptions


def extract(
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    engine: str = O.engine,
    backbone: str | None = O.backbone,
    weights: str | os.PathLike | None = O.weights,
    onnx: str | os.PathLike | None = O.onnx,
    backbone_from: str | os.PathLike | None = O.backbone_from,
    input_size: int | None = O.input_size,
    resize: int | None = O.resize,
    mean: tuple[float, float, float] | None = O.mean,
    std: tuple[float, float, float] | None = O.std,
    interpolation: str | None = O.interpolation,
    batch_size: int | None = O.batch_size,
    provider: str = O.provider,
    precision: str = O.precision,
    workers: int | None = O.workers,
    threads: int | None = O.threads,
    strict: bool = O.strict,
    shard_size: int = O.shard_size,
    draft: bool = O.draft,
    decode: str = O.decode,
    progress: bool = O.progress,
    group_regex: str | None = O.group_regex,
    dicom_frames: str = O.dicom_frames,
    dicom_group: str = O.dicom_group,
    lock_wait: float = O.lock_wait,
    group_salt: str | None = O.group_salt,
    cuda: CudaOptions | None = O.cuda,
    ray_address: str | None = O.ray_address,
    actors: int | None = O.actors,
) -> ExtractSummary:
    """Extract pooled features for every image under ``images`` into Parquet shards in ``out``.

    Incremental and resumable: images already in ``out`` (unchanged) are skipped, changed ones are
    re-extracted, removed ones are dropped from the shards. Bad images are recorded in
    ``OUT.meta/errors.parquet`` and the run goes on, unless ``strict``.

    ``engine="local"`` runs on this machine; ``engine="ray"`` on a Ray cluster (same shards, errors and
    summary; ``ray_address``, ``actors``: see :class:`~stage1_extract.engines.ray_driver.RayEngine`; there
    ``out`` may be a URI such as ``s3://bucket/features`` and images must be readable on every node).

    ``decode="cpu"`` decodes with PIL in worker processes; ``decode="gpu"`` decodes JPEGs on the GPU's
    hardware JPEG decoder (nvImageCodec, the ``[gpu-decode]`` extra) and resizes there (other files fall back
    to PIL), which lifts the decode wall on GPU machines. On a GPU, copies to the device and inference overlap
    decoding and writing (:mod:`stage1_extract.runtime.inference`); ``cuda`` tunes ONNX Runtime's CUDA provider
    (:class:`~stage1_extract.runtime.session.CudaOptions`: NHWC, cuDNN search, CUDA graphs).

    Each image's ``group`` (e.g. a patient) comes from a file list's ``group`` column, or from ``group_regex``
    (one capture group, searched in the relative path); stage 2 never splits a group. DICOM rows without one
    get a salted hash of their PatientID (``dicom_group="study"``: StudyInstanceUID; ``"none"``: no group; the
    salt: see :mod:`stage1_extract.inputs.dicom_records`). ``backbone_from``: a fine-tuned run directory
    (``stage2-classify finetune``): its backbone, weights and input size, recorded as the shards' provenance. ``dicom_frames="all"``: one row per frame of a
    multi-frame DICOM (path ``scan.dcm#frame=3``, 1-based) instead of its first frame only.

    One run writes to ``out`` at a time; ``lock_wait`` seconds: how long to wait for another one to finish
    (default 0: :class:`~stage1_extract.run.lock.OutputLockedError` at once, naming its pid).
    """
    given = locals()  # the arguments, nothing else yet
    return run_extraction(images, out, O(**{f.name: given[f.name] for f in dataclasses.fields(O)}))


def extract_ray(images: str | os.PathLike, out: str | os.PathLike, *, ray_address: str | None = None,
                actors: int | None = None, **options) -> ExtractSummary:
    """:func:`extract` on a Ray cluster: ``extract(images, out, engine="ray", …)``; same options, same output."""
    return extract(images, out, engine="ray", ray_address=ray_address, actors=actors, **options)
