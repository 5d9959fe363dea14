"""The stage-1 runner: list → plan → decode (workers) → ONNX Runtime → shards, with a summary.

Each part is its own module (sources, plan, loader, session, inference, writer; the run's start and end in
lifecycle, shared with the Ray engine); this one only wires them and times them, so the report shows at
once which part is the wall.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TYPE_CHECKING

from stage1_extract.model.export import ExtractorModel, export_backbone, wrap_user_onnx
from stage1_extract.run.lifecycle import (  # noqa: F401  (ExtractSummary, StrictModeError: public via this module)
    SUMMARY_FILE,
    ExtractSummary,
    StrictModeError,
    check_finite,
    default_batch_size,
    list_inputs,
    open_run,
    plan_on,
)
from stage1_extract.run.lifecycle import shard_metadata  # noqa: F401  (re-exported)
from stage1_extract.run.lifecycle import versions as _versions  # noqa: F401  (the benchmark records them)
from stage1_extract.run.writer import Interrupted, ShardWriter, run_stamp

if TYPE_CHECKING:
    from stage1_extract.runtime.session import CudaOptions

log = logging.getLogger(__name__)


def prepare_model(backbone: str | None = None, *, weights=None, onnx=None, precision: str = "fp32",
                  input_size=None, resize=None, mean=None, std=None, interpolation=None) -> ExtractorModel:
    """The ONNX extractor for a registry backbone (exported and cached) or for a user's ONNX file."""
    if onnx is not None:
        kwargs = {k: v for k, v in dict(input_size=input_size, resize=resize, mean=mean, std=std,
                                        interpolation=interpolation).items() if v is not None}
        return wrap_user_onnx(onnx, **kwargs)
    from stage1_extract.model.registry import DEFAULT_BACKBONE

    return export_backbone(backbone or DEFAULT_BACKBONE, weights=weights, precision=precision)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def default_workers(on_gpu: bool) -> int:
    """On CPU one decode worker per core: they share the cores with ONNX Runtime, and idle (blocked on a free
    slot) whenever the model is the slower side, so extra workers cost nothing on small images, while large
    photographs (~25 ms each to decode, 3× the model's time per image) need them all."""
    cores = _cpu_count()
    return max(1, cores - 1) if on_gpu else cores


#: decode → (decoder, device). torch-cpu / nvimgcodec-cpu: a GPU decoder's code on the CPU, for checking it.
DECODERS = {"cpu": ("pool", None), "gpu": ("gpu", "cuda"), "torch-cpu": ("torch", "cpu"),
            "nvimgcodec-cpu": ("nvimgcodec", "cpu")}


def _decoder(decode: str, prep, batch_size: int, workers: int, draft: bool):
    """The batch source: PIL in worker processes (cpu), nvImageCodec's hardware JPEG decoder (gpu, falling
    back to torchvision's nvJPEG when the ``[gpu-decode]`` extra is missing), or a GPU decoder on the CPU."""
    kind, device = DECODERS[decode]
    if kind == "pool":
        from stage1_extract.decoding.pool import DecodePool

        return DecodePool(prep, batch_size=batch_size, workers=workers, draft=draft)
    if kind in ("gpu", "nvimgcodec"):
        from stage1_extract.decoding.nvimgcodec import NvImageCodecDecoder, nvimgcodec_available

        if kind == "nvimgcodec" or nvimgcodec_available():
            return NvImageCodecDecoder(prep, batch_size=batch_size, device=device, io_threads=max(2, workers))
        log.warning("--decode gpu: nvImageCodec is not installed, so JPEGs are decoded by torchvision's nvJPEG "
                    "(no hardware decoder, slower); pip install 'hybrid-transfer[gpu-decode]'")
    from stage1_extract.decoding.torch_decoder import TorchDecoder

    return TorchDecoder(prep, batch_size=batch_size, device=device, io_threads=max(2, workers))


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    # None: no bar when stderr is not a terminal (a redirected log would fill with carriage-return frames)
    return tqdm(total=total, unit="img", desc="extracting", disable=None if enabled else True, dynamic_ncols=True,
                smoothing=0.1, file=sys.stderr)


def extract(
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    backbone: str | None = None,
    weights: str | os.PathLike | None = None,
    onnx: str | os.PathLike | None = None,
    input_size: int | None = None,
    resize: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    interpolation: str | None = None,
    batch_size: int | None = None,
    provider: str = "auto",
    precision: str = "fp32",
    workers: int | None = None,
    threads: int | None = None,
    strict: bool = False,
    shard_size: int = 2048,
    draft: bool = False,
    decode: str = "cpu",
    progress: bool = True,
    group_regex: str | None = None,
    dicom_frames: str = "first",
    dicom_group: str = "patient",
    group_salt: str | None = None,
    cuda: CudaOptions | None = None,
) -> ExtractSummary:
    """Extract pooled features for every image under ``images`` into Parquet shards in ``out``.

    Incremental and resumable: images already in ``out`` (unchanged) are skipped, changed ones are
    re-extracted, removed ones are dropped from the shards. Bad images are recorded in
    ``OUT.meta/errors.parquet`` and the run goes on, unless ``strict``.

    ``decode="cpu"`` decodes with PIL in worker processes; ``decode="gpu"`` decodes JPEGs on the GPU's
    hardware JPEG decoder (nvImageCodec, the ``[gpu-decode]`` extra) and resizes there (other files fall back
    to PIL), which lifts the decode wall on GPU machines. On a GPU, copies to the device and inference overlap
    decoding and writing (:mod:`stage1_extract.runtime.inference`); ``cuda`` tunes ONNX Runtime's CUDA provider
    (:class:`~stage1_extract.runtime.session.CudaOptions`: NHWC, cuDNN search, CUDA graphs).

    Each image's ``group`` (e.g. a patient) comes from a file list's ``group`` column, or from ``group_regex``
    (one capture group, searched in the relative path); stage 2 never splits a group. DICOM rows without one
    get a salted hash of their PatientID (``dicom_group="study"``: StudyInstanceUID; ``"none"``: no group; the
    salt: see :mod:`stage1_extract.inputs.dicom_records`). ``dicom_frames="all"``: one row per frame of a multi-frame
    DICOM (path ``scan.dcm#frame=3``, 1-based) instead of its first frame only.
    """
    if decode not in DECODERS:
        raise ValueError(f"decode must be one of {sorted(DECODERS)}, not {decode!r}")
    from stage1_extract.runtime.inference import OverlappedInference
    from stage1_extract.runtime.session import FeatureSession, wants_gpu

    t_start = time.perf_counter()
    # first: a wrong --images or --out is reported before the model export
    out, listing = list_inputs(images, out, group_regex=group_regex, dicom_frames=dicom_frames,
                               dicom_group=dicom_group, group_salt=group_salt)
    model = prepare_model(backbone, weights=weights, onnx=onnx, precision=precision, input_size=input_size,
                          resize=resize, mean=mean, std=std, interpolation=interpolation)
    with open_run(listing, out, model, provider=provider, strict=strict, t_start=t_start) as run:
        timings, todo = run.timings, run.todo
        if todo:
            bs = batch_size or default_batch_size(wants_gpu(provider))
            session = FeatureSession(model.onnx_path, provider=provider, input_size=model.preprocessing.input_size,
                                     batch_size=bs, threads=threads, cuda=cuda, precision=model.precision)
            run.summary.provider = session.provider
            n_workers = workers or default_workers(session.on_gpu)
            writer = ShardWriter(run.out, run.meta, shard_size=shard_size, stamp=run_stamp())

            def write(done) -> None:
                for ok, feats in done:  # features come back in submission order
                    recs = [todo[it.index] for it in ok]
                    check_finite(feats, [r.path for r in recs])
                    writer.add([r.path for r in recs], [r.label for r in recs], [it.content_id for it in ok],
                               [it.file_size for it in ok], [it.mtime_ns for it in ok], feats,
                               groups=[r.group for r in recs])

            bar = _progress(len(todo), progress)
            t_loop = time.perf_counter()
            try:
                with _decoder(decode, model.preprocessing, session.batch_size, n_workers, draft) as pool, \
                        OverlappedInference(session) as infer:
                    t_wait = time.perf_counter()
                    for batch in pool.run([r.abspath for r in todo]):
                        timings["wait_decode"] += time.perf_counter() - t_wait
                        timings["decode_worker"] += batch.decode_seconds
                        ok = [it for it in batch.items if it.row >= 0]
                        for it in batch.items:
                            if it.row < 0:
                                run.add_error(todo[it.index].path, it.reason, it.content_id, it.file_size,
                                              it.mtime_ns, transient=it.transient)
                        if run.stop_for_strict:
                            break
                        # the pixels are staged before submit returns: the pool may reuse the batch's slot
                        infer.submit(batch.pixels, len(ok), ok)
                        write(infer.ready())
                        bar.update(len(batch.items))
                        bar.set_postfix(errors=len(run.new_errors), refresh=False)
                        t_wait = time.perf_counter()
                    write(infer.drain())
                    timings["infer"] += infer.infer_seconds
                writer.close()
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt):  # the rows computed so far are complete: keep them
                    try:
                        writer.close()
                    except Exception as write_exc:
                        log.warning("could not save the rows computed before the interrupt: %s", write_exc)
                    raise Interrupted(run.out, writer.written_rows, run.plan.done, by=exc) from None
                writer.abort()
                raise
            finally:
                bar.close()
            timings["write"] = writer.write_seconds
            run.loop_done(seconds=time.perf_counter() - t_loop, extracted=writer.written_rows,
                          shards=len(writer.shards))
    return run.summary
