"""The stage-1 runner: list → plan → decode (workers) → ONNX Runtime → shards, with a summary.

Each part is its own module (sources, plan, loader, session, writer); this one only wires them and
times them, so the report shows at once which part is the wall.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import glob
import logging
import os
import platform
import sys
import time
from typing import Any

import numpy as np

from shardformat import IncompatibleShardsError, ShardMetadata, read_index, resolve
from stage1_extract.export import ExtractorModel, export_backbone, wrap_user_onnx
from stage1_extract.lock import OutputLock
from stage1_extract.plan import compact, make_plan
from stage1_extract.signals import saved_note, sigterm_as_interrupt
from stage1_extract.sources import list_images
from stage1_extract.writer import ShardWriter, read_errors, run_stamp, write_errors, write_json

log = logging.getLogger(__name__)
SUMMARY_FILE = "_run.json"


class StrictModeError(RuntimeError):
    """``strict=True`` and an input could not be used."""


@dataclasses.dataclass
class ExtractSummary:
    out: str
    backbone: str
    provider: str
    listed: int = 0
    extracted: int = 0
    already_done: int = 0
    errors_new: int = 0
    errors_known: int = 0
    removed_rows: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    empty_classes: list[str] = dataclasses.field(default_factory=list)
    shards_written: int = 0

    @property
    def errors(self) -> int:
        return self.errors_new + self.errors_known

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "errors": self.errors}

    def format(self) -> str:
        t = self.timings
        lines = [
            f"stage 1 done: {self.out}",
            f"  backbone {self.backbone} on {self.provider}",
            f"  listed {self.listed} · extracted {self.extracted} · already done {self.already_done} · "
            f"errors {self.errors} ({self.errors_new} new, {self.errors_known} known)"
            + (f" · removed {self.removed_rows} stale rows" if self.removed_rows else ""),
        ]
        if self.extracted:
            lines.append(
                f"  {self.images_per_second:.1f} img/s over {self.seconds:.1f}s "
                f"(waiting for decode {t.get('wait_decode', 0):.1f}s, inference {t.get('infer', 0):.1f}s, "
                f"shard writes {t.get('write', 0):.1f}s in background)"
            )
        if self.errors:
            lines.append(f"  see {os.path.join(self.out, '_errors.parquet')} for the failed files and why")
        if self.empty_classes:
            lines.append(f"  empty class folders (ignored): {', '.join(self.empty_classes)}")
        return "\n".join(lines)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("onnxruntime-gpu", "onnxruntime", "onnx", "torch", "torchvision", "timm", "numpy", "pyarrow",
                 "pillow", "hybrid-transfer"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def shard_metadata(model: ExtractorModel) -> ShardMetadata:
    return ShardMetadata(
        backbone=model.backbone,
        weights_id=model.weights_id,
        onnx_sha256=model.onnx_sha256,
        preprocessing=model.preprocessing.to_dict(),
        feature_dim=model.feature_dim,
        precision=model.precision,
        versions=_versions(),
    )


def prepare_model(backbone: str | None = None, *, weights=None, onnx=None, precision: str = "fp32",
                  input_size=None, resize=None, mean=None, std=None, interpolation=None) -> ExtractorModel:
    """The ONNX extractor for a registry backbone (exported and cached) or for a user's ONNX file."""
    if onnx is not None:
        kwargs = {k: v for k, v in dict(input_size=input_size, resize=resize, mean=mean, std=std,
                                        interpolation=interpolation).items() if v is not None}
        return wrap_user_onnx(onnx, **kwargs)
    from stage1_extract.backbones import DEFAULT_BACKBONE

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


def _clean_temporaries(out: str) -> None:
    if "://" not in out:
        for tmp in glob.glob(os.path.join(out, ".tmp-*")):
            try:
                os.unlink(tmp)
            except OSError:
                pass


DECODERS = {"cpu": None, "gpu": "cuda", "torch-cpu": "cpu"}  # torch-cpu: the GPU decoder's code on the CPU


def _decoder(decode: str, prep, batch_size: int, workers: int, draft: bool):
    """The batch source: PIL in worker processes (cpu), or torchvision on a device (gpu, torch-cpu)."""
    if decode == "cpu":
        from stage1_extract.loader import DecodePool

        return DecodePool(prep, batch_size=batch_size, workers=workers, draft=draft)
    from stage1_extract.torch_decode import TorchDecoder

    return TorchDecoder(prep, batch_size=batch_size, device=DECODERS[decode], io_threads=max(2, workers))


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="extracting", disable=not enabled, dynamic_ncols=True,
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
) -> ExtractSummary:
    """Extract pooled features for every image under ``images`` into Parquet shards in ``out``.

    Incremental and resumable: images already in ``out`` (unchanged) are skipped, changed ones are
    re-extracted, removed ones are dropped from the shards. Bad images are recorded in
    ``out/_errors.parquet`` and the run goes on, unless ``strict``.

    ``decode="cpu"`` decodes with PIL in worker processes; ``decode="gpu"`` decodes JPEGs with nvJPEG and
    resizes on the GPU (other files fall back to PIL), which lifts the decode wall on GPU machines.
    """
    if decode not in DECODERS:
        raise ValueError(f"decode must be one of {sorted(DECODERS)}, not {decode!r}")
    from stage1_extract.session import FeatureSession, wants_gpu

    t_start = time.perf_counter()
    out = os.fspath(out)
    if "://" not in out:
        out = os.path.abspath(out)
    model = prepare_model(backbone, weights=weights, onnx=onnx, precision=precision, input_size=input_size,
                          resize=resize, mean=mean, std=std, interpolation=interpolation)
    meta = shard_metadata(model)
    listing = list_images(images)
    with OutputLock(out) if "://" not in out else _nullcontext(), sigterm_as_interrupt():
        plan, listing_errors, listing_known, summary = _open_run(out, model, meta, listing, provider, strict)
        new_errors: list[dict] = []
        timings = {"wait_decode": 0.0, "infer": 0.0, "write": 0.0, "decode_worker": 0.0}
        if plan.todo:
            # Bigger batches pay off only on a GPU; on a CPU they only cost memory (ORT's arena: ~1 GB at 32,
            # ~0.65 GB at 16) and are no faster (bs 4–16 beat 32 by ~6% on 2 cores: smaller working set).
            bs = batch_size or (256 if wants_gpu(provider) else 16)
            session = FeatureSession(model.onnx_path, provider=provider, input_size=model.preprocessing.input_size,
                                     batch_size=bs, threads=threads)
            summary.provider = session.provider
            n_workers = workers or default_workers(session.on_gpu)
            todo = plan.todo
            writer = ShardWriter(out, meta, shard_size=shard_size, stamp=run_stamp())
            bar = _progress(len(todo), progress)
            t_loop = time.perf_counter()
            try:
                with _decoder(decode, model.preprocessing, session.batch_size, n_workers, draft) as pool:
                    t_wait = time.perf_counter()
                    for batch in pool.run([r.abspath for r in todo]):
                        timings["wait_decode"] += time.perf_counter() - t_wait
                        timings["decode_worker"] += batch.decode_seconds
                        ok = [it for it in batch.items if it.row >= 0]
                        for it in batch.items:
                            if it.row < 0:
                                new_errors.append({"path": todo[it.index].path, "reason": it.reason,
                                                   "content_id": it.content_id, "file_size": it.file_size,
                                                   "mtime_ns": it.mtime_ns, "transient": it.transient})
                        if strict and new_errors:
                            break
                        if ok:
                            t0 = time.perf_counter()
                            feats = session.run(batch.pixels, len(ok))
                            timings["infer"] += time.perf_counter() - t0
                            recs = [todo[it.index] for it in ok]
                            if not np.isfinite(feats).all():
                                bad = ~np.isfinite(feats).all(axis=1)
                                raise FloatingPointError(
                                    f"the model produced non-finite features for {int(bad.sum())} image(s), "
                                    f"e.g. {recs[int(np.argmax(bad))].path}"
                                )
                            writer.add([r.path for r in recs], [r.label for r in recs],
                                       [it.content_id for it in ok], [it.file_size for it in ok],
                                       [it.mtime_ns for it in ok], feats)
                        bar.update(len(batch.items))
                        bar.set_postfix(errors=len(new_errors), refresh=False)
                        t_wait = time.perf_counter()
                writer.close()
            except BaseException as exc:
                writer.abort()
                saved_note(exc, writer.written_rows, len(writer.shards), out)
                # Record what failed so far; finished shards are already safe on disk. On a full or read-only
                # disk this write fails too: keep the original error (which names the shard), not this one.
                try:
                    write_errors(out, listing_errors + plan.known_errors + new_errors)
                except OSError as exc:
                    log.warning("could not update the errors table after the failure: %s", exc)
                raise
            finally:
                bar.close()
            loop_seconds = time.perf_counter() - t_loop
            timings["write"] = writer.write_seconds
            summary.extracted = writer.written_rows
            summary.shards_written = len(writer.shards)
            summary.seconds = loop_seconds
            summary.images_per_second = len(todo) / loop_seconds if loop_seconds > 0 else 0.0
        _finish_run(out, meta, summary, plan, listing_errors, listing_known, new_errors, timings, strict, t_start)
    return summary


def _open_run(out: str, model: ExtractorModel, meta: ShardMetadata, listing, provider: str, strict: bool):
    """Start of a run, shared by the engines (the caller holds the output lock): refuse incompatible shards,
    plan what to do, and count the errors already known. Returns (plan, listing_errors, listing_known, summary)."""
    _clean_temporaries(out)
    index, existing = read_index(out)
    if existing is not None and existing.compatibility_key() != meta.compatibility_key():
        raise IncompatibleShardsError(
            f"{out} already holds shards made with {existing.describe()}; this run uses "
            f"{meta.describe()}. Use a separate --out for each backbone."
        )
    previous_errors = read_errors(out)
    plan = make_plan(listing.records, index, previous_errors)
    listing_errors = [{"path": p, "reason": r} for p, r in listing.problems]
    seen_before = {e["path"] for e in previous_errors}
    listing_known = sum(e["path"] in seen_before for e in listing_errors)
    summary = ExtractSummary(out=out, backbone=model.backbone, provider=provider, listed=len(listing.records),
                             already_done=plan.done, errors_known=len(plan.known_errors) + listing_known,
                             empty_classes=listing.empty_classes)
    if strict and (listing_errors or plan.known_errors):
        first = (listing_errors or plan.known_errors)[0]
        write_errors(out, listing_errors + plan.known_errors)
        raise StrictModeError(f"--strict: {first['path']}: {first['reason']}")
    return plan, listing_errors, listing_known, summary


def plan_on(out: str, plan):
    """``plan`` with its shards named by URI when ``out`` is one, for :func:`compact`: listings give filesystem
    paths (``bucket/prefix/part-….parquet`` on S3, ``/prefix/…`` on HDFS) that would otherwise read as local."""
    if "://" not in out:
        return plan
    base, sep, query = out.partition("?")

    def uri(shard: str) -> str:
        return f"{base.rstrip('/')}/{shard.rsplit('/', 1)[-1]}{sep}{query}"

    return dataclasses.replace(plan, stale_rows={uri(s): n for s, n in plan.stale_rows.items()},
                               keep={uri(s): k for s, k in plan.keep.items()},
                               refresh_mtime={uri(s): m for s, m in plan.refresh_mtime.items()})


def _finish_run(out: str, meta: ShardMetadata, summary: ExtractSummary, plan, listing_errors: list[dict],
                listing_known: int, new_errors: list[dict], timings: dict[str, float], strict: bool,
                t_start: float) -> None:
    """End of a run, shared by the engines: errors table, strict check, compaction, ``_run.json``."""
    summary.errors_new = len(new_errors) + len(listing_errors) - listing_known
    write_errors(out, listing_errors + plan.known_errors + new_errors)
    if strict and new_errors:
        first = new_errors[0]
        raise StrictModeError(f"--strict: {first['path']}: {first['reason']}")
    summary.removed_rows = compact(plan_on(out, plan))
    summary.timings = {k: round(v, 3) for k, v in timings.items()}
    write_json(out, SUMMARY_FILE, {
        **summary.as_dict(),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "shard_metadata": meta.to_json(),
    })


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None
