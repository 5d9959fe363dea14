"""One stage-1 run from start to end, shared by every engine (local processes, Ray).

The runner (:mod:`stage1_extract.engines.runner`) opens a run with :func:`open_run`; the engine only moves
pixels: it feeds the run what happened to each image
(:meth:`Run.add_error`, timings, the loop's totals) and leaves the rest here, so the start (output lock,
compatibility check, incremental plan), the end (errors table, strict check, compaction, ``OUT.meta/run.json``),
the errors table after a failure, the non-finite check, shard naming and the batch-size default exist once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import glob
import logging
import os
import platform
import time
from typing import Any, Iterator

import numpy as np

from shardformat import IncompatibleShardsError, ShardMetadata, read_index
from shardformat.layout import errors_path, meta_dir, require_folder
from stage1_extract.run.plan import compact, make_plan, nonfinite_rows
from stage1_extract.run.signals import sigterm_as_interrupt
from shardformat import read_errors, write_errors
from stage1_extract.run.writer import write_json
from stage1_extract.errors import NonFiniteFeaturesError, Stage1Error

log = logging.getLogger(__name__)
SUMMARY_FILE = "run.json"  # in OUT.meta/, beside the errors table
TIMING_KEYS = ("wait_decode", "infer", "write", "decode_worker")


class StrictModeError(Stage1Error, RuntimeError):
    """``strict=True`` and an input could not be used."""


class OutputReadOnlyError(Stage1Error, PermissionError):
    """The output cannot be written and the run has something to write (a no-op rerun only reads)."""


@dataclasses.dataclass
class ExtractSummary:
    out: str
    backbone: str
    provider: str
    images_root: str = ""  # what shard paths are relative to (the data doctor's report finds thumbnails there)
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
    ungrouped: int = 0  # paths --group-regex did not match
    hidden_folders: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)  # what listing changed (labels read as missing…)

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
            lines.append(f"  see {errors_path(self.out)} for the failed files and why")
        if self.empty_classes:
            lines.append(f"  empty class folders (ignored): {', '.join(self.empty_classes)}")
        if self.ungrouped:
            lines.append(f"  {self.ungrouped} path(s) did not match --group-regex: each is its own group")
        if self.hidden_folders:
            lines.append(f"  hidden folders (ignored; rename without the leading '.' to use them): "
                         f"{', '.join(self.hidden_folders)}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def versions() -> dict[str, str]:
    """Versions of what shapes the features, recorded in every shard's metadata."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("onnxruntime-gpu", "onnxruntime", "onnx", "torch", "torchvision", "timm", "numpy", "pyarrow",
                 "pillow", "hybrid-transfer"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def shard_metadata(model) -> ShardMetadata:
    """The metadata every shard of ``model`` (an :class:`~stage1_extract.model.export.ExtractorModel`) carries."""
    return ShardMetadata(
        backbone=model.backbone,
        weights_id=model.weights_id,
        onnx_sha256=model.onnx_sha256,
        preprocessing=model.preprocessing.to_dict(),
        feature_dim=model.feature_dim,
        precision=model.precision,
        versions=versions(),
        provenance=dict(getattr(model, "provenance", None) or {}),
    )


def default_batch_size(on_gpu: bool) -> int:
    """Bigger batches pay off only on a GPU; on a CPU they only cost memory (ORT's arena: ~1 GB at 32,
    ~0.65 GB at 16) and are no faster (bs 4–16 beat 32 by ~6% on 2 cores: smaller working set)."""
    return 256 if on_gpu else 16


def nonfinite_message(features: np.ndarray, paths: list[str]) -> str | None:
    """Why ``features`` (one row per path) must not be written, or None when every value is finite."""
    finite = np.isfinite(features).all(axis=1)
    if finite.all():
        return None
    bad = ~finite
    return (f"the model produced non-finite features for {int(bad.sum())} image(s), "
            f"e.g. {paths[int(np.argmax(bad))]}")


def check_finite(features: np.ndarray, paths: list[str]) -> None:
    """Raise :class:`FloatingPointError` when a feature row is NaN or infinite (a broken model, not an image)."""
    message = nonfinite_message(features, paths)
    if message:
        raise NonFiniteFeaturesError(message)


def normalise_out(out: str | os.PathLike) -> str:
    """The real path of a local ``out`` (symbolic links resolved, so that two spellings of one folder share one
    lock and one ``OUT.meta``); URIs (``s3://…``) unchanged."""
    out = os.fspath(out)
    return out if "://" in out else os.path.realpath(os.path.expanduser(out))


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


def _clean_temporaries(out: str) -> None:
    if "://" not in out:
        for tmp in glob.glob(os.path.join(out, ".tmp-*")) + glob.glob(os.path.join(meta_dir(out), ".tmp-*")):
            try:
                os.unlink(tmp)
            except OSError:
                pass


class Run:
    """The bookkeeping of one run: its plan, the errors so far, the timings, and the summary it returns."""

    def __init__(self, out: str, model, meta: ShardMetadata, listing, provider: str, strict: bool,
                 t_start: float) -> None:
        self.out, self.model, self.meta, self.strict, self.t_start = out, model, meta, strict, t_start
        _clean_temporaries(out)
        index, existing = read_index(out)
        if existing is not None and existing.compatibility_key() != meta.compatibility_key():
            raise IncompatibleShardsError(
                f"{out} already holds shards made with {existing.describe()}; this run uses "
                f"{meta.describe()}. Use a separate --out for each backbone."
            )
        previous_errors = read_errors(out)
        self.plan = make_plan(listing.records, index, previous_errors, broken=nonfinite_rows(out, index))
        self.listing_errors = [{"path": p, "reason": r} for p, r in listing.problems]
        seen_before = {e["path"] for e in previous_errors}
        self.listing_known = sum(e["path"] in seen_before for e in self.listing_errors)
        self.previous_errors = len(previous_errors)
        self.read_only: str | None = None  # why the output cannot be written (set by open_run), None if it can
        self.new_errors: list[dict] = []
        self.timings = {k: 0.0 for k in TIMING_KEYS}
        self.summary = ExtractSummary(out=out, backbone=model.backbone, provider=provider,
                                      listed=len(listing.records), already_done=self.plan.done,
                                      errors_known=len(self.plan.known_errors) + self.listing_known,
                                      empty_classes=listing.empty_classes, ungrouped=listing.ungrouped,
                                      hidden_folders=listing.hidden_folders, notes=list(listing.notes))
        self.summary.images_root = listing.root
        if strict and (self.listing_errors or self.plan.known_errors):
            first = (self.listing_errors or self.plan.known_errors)[0]
            write_errors(out, self.listing_errors + self.plan.known_errors)
            raise StrictModeError(f"--strict: {first['path']}: {first['reason']}")

    @property
    def todo(self) -> list:
        return self.plan.todo

    def add_error(self, path: str, reason: str, content_id: str | None = None, file_size: int | None = None,
                  mtime_ns: int | None = None, *, transient: bool = False) -> None:
        """Record an image that could not be used; ``transient`` (out of memory, I/O error, a killed worker):
        not the file's fault, so the next run tries it again."""
        self.new_errors.append({"path": path, "reason": reason, "content_id": content_id,
                                "file_size": file_size, "mtime_ns": mtime_ns, "transient": transient})

    @property
    def stop_for_strict(self) -> bool:
        """``strict`` and an image already failed: the engine should stop feeding the run."""
        return self.strict and bool(self.new_errors)

    @property
    def changes_nothing(self) -> bool:
        """Nothing to extract, remove, refresh or newly record: the shards and the errors table stay as they are."""
        p = self.plan
        return (not p.todo and not p.stale_rows and not p.refresh_mtime and not self.new_errors
                and self.listing_known == len(self.listing_errors)
                and self.previous_errors == len(p.known_errors) + self.listing_known)

    def refuse_if_read_only(self) -> None:
        """A read-only output can take a no-op rerun only: say so before any work, naming what would change."""
        if self.read_only is None or self.changes_nothing:
            return
        p = self.plan
        work = [f"{len(p.todo)} image(s) to extract" if p.todo else "",
                f"{sum(p.stale_rows.values())} stale row(s) to remove" if p.stale_rows else "",
                f"{len(self.listing_errors) - self.listing_known} new listing problem(s) to record"
                if len(self.listing_errors) > self.listing_known else ""]
        todo = ", ".join(w for w in work if w) or "its errors table to update"
        raise OutputReadOnlyError(
            f"{self.out} is read-only ({self.read_only}) and this run has {todo}, which means writing shards "
            f"and {meta_dir(self.out)}; make both writable, or choose another --out (a rerun that changes nothing "
            "works read-only)"
        )

    def all_errors(self) -> list[dict]:
        return self.listing_errors + self.plan.known_errors + self.new_errors

    def record_errors_after_failure(self) -> None:
        """The errors so far, after a failure; finished shards are already safe on disk. On a full or read-only
        disk this write fails too: keep the original error (which names the shard), not this one."""
        try:
            write_errors(self.out, self.all_errors())
        except OSError as exc:
            log.warning("could not update the errors table after the failure: %s", exc)

    def loop_done(self, *, seconds: float, extracted: int, shards: int) -> None:
        s = self.summary
        s.extracted, s.shards_written, s.seconds = extracted, shards, seconds
        s.images_per_second = len(self.todo) / seconds if seconds > 0 else 0.0

    def finish(self) -> ExtractSummary:
        """End of a run: errors table, strict check, compaction, ``OUT.meta/run.json``."""
        s = self.summary
        s.errors_new = len(self.new_errors) + len(self.listing_errors) - self.listing_known
        s.timings = {k: round(v, 3) for k, v in self.timings.items()}
        if self.changes_nothing and self.read_only:
            s.notes.append(f"{self.out} is read-only: nothing changed, nothing written")
            return s
        write_errors(self.out, self.all_errors())
        if self.strict and self.new_errors:
            first = self.new_errors[0]
            raise StrictModeError(f"--strict: {first['path']}: {first['reason']}")
        s.removed_rows = compact(plan_on(self.out, self.plan))
        write_json(self.out, SUMMARY_FILE, {
            **s.as_dict(),
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "total_seconds": round(time.perf_counter() - self.t_start, 3),
            "shard_metadata": self.meta.to_json(),
        })
        return s


def _unwritable(out: str) -> str | None:
    """Why this process may not write the run's files (the shards in ``OUT``, the bookkeeping in ``OUT.meta``
    or its errors table), or None when it may."""
    if "://" in out:
        return None
    meta = meta_dir(out)
    for where in (out, meta if os.path.isdir(meta) else os.path.dirname(meta), errors_path(out)):
        if os.path.exists(where) and (not os.access(where, os.W_OK) or _read_only_mount(where)):
            return f"Permission denied: {where} is not writable"
    return None


def _read_only_mount(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def list_inputs(images, out: str | os.PathLike, *, group_regex: str | None = None, dicom_frames: str = "first",
                dicom_group: str = "patient", group_salt: str | None = None):
    """Check ``out`` and list ``images`` (groups from ``group_regex``, DICOM rows' salted groups and frames):
    every engine calls this before exporting the model, so a wrong ``--images``/``--out`` fails in a second.
    Returns ``(out, listing)`` with ``out`` normalised."""
    from stage1_extract.inputs.dicom_records import prepare_dicom_records
    from stage1_extract.inputs.groups import compile_group_regex
    from stage1_extract.inputs.listing import list_images

    compile_group_regex(group_regex)  # a bad pattern fails now, not after the model export
    require_folder(out)
    require_folder(meta_dir(normalise_out(out)), "--out (its bookkeeping folder)")
    listing = prepare_dicom_records(list_images(images, group_regex=group_regex), frames=dicom_frames,
                                    group_by=dicom_group, salt=group_salt)
    return normalise_out(out), listing


@contextlib.contextmanager
def open_run(listing, out: str | os.PathLike, model, *, provider: str, strict: bool,
             t_start: float | None = None, lock_wait: float = 0.0) -> Iterator[Run]:
    """``with open_run(listing, out, model, …) as run:`` — the engine's loop goes in the block.

    ``listing`` comes from :func:`list_inputs`. Takes the output lock (local ``out`` only; waiting up to
    ``lock_wait`` seconds for another run), refuses shards of another model and plans the incremental run. A clean
    exit finishes the run; an exception first records the errors so far. An output that cannot be written takes a
    run that changes nothing (its summary says so) and refuses any other, before any work.
    """
    from stage1_extract.run.lock import OutputLock

    t_start = time.perf_counter() if t_start is None else t_start
    out = normalise_out(out)
    meta = shard_metadata(model)
    # SIGTERM (kill, docker stop, a scheduler's time limit) stops the run like Ctrl-C: shards kept, lock released
    lock = OutputLock(out, wait=lock_wait) if "://" not in out else contextlib.nullcontext()
    with lock, sigterm_as_interrupt():
        run = Run(out, model, meta, listing, provider, strict, t_start)
        run.read_only = getattr(lock, "read_only", None) or _unwritable(out)
        run.refuse_if_read_only()
        try:
            yield run
        except BaseException:
            run.record_errors_after_failure()
            raise
        run.finish()
