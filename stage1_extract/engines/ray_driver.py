"""Stage 1 on a Ray cluster (``stage1-extract --engine ray``): the same shards, errors and summary as the
local engine, with the work spread over Ray Data.

    image list (driver) ──► decode: CPU tasks ──► inference: actor pool ──► shard writes: tasks ──► small rows
                             (decode.decode_file,   (one FeatureSession per      (shardformat.write_shard,      back to the
                              uint8 pixels)          actor; 1 GPU each, or CPUs)  atomic, named per run+batch)  driver

The driver does what the local engine does before and after the loop, with the same functions: it lists
the images, takes the output lock (local ``out`` only), plans the incremental run, and at the end records
the errors, compacts stale rows and writes ``_run.json``. Only small per-image rows (path, reason, shard,
timings) come back to it; pixels and features stay in Ray's object store.

The run's start and end are :mod:`stage1_extract.run.lifecycle`'s, as for the local engine.

Exactly-once: a shard is named ``part-<run stamp>-<hash of its paths>.parquet``
(:func:`~shardformat.layout.shard_name`), so a retried write task
rewrites the same file instead of adding a second copy, and the names sort after every earlier run's
shards (the stamp is :func:`stage1_extract.run.writer.run_stamp`). After the run the driver checks that the
shards it was told about are the ones in ``out``: leftovers of failed attempts are deleted and a path
reported in two shards keeps one row.

Ray is an optional extra (``pip install hybrid-transfer[ray]``); it is imported only inside functions.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install hybrid-transfer[ray]"
#: images per decode task (upper bound); small enough to spread a modest collection over every CPU
MAX_DECODE_BLOCK = 256

ITEMS_SCHEMA = pa.schema([("path", pa.string()), ("abspath", pa.string()), ("label", pa.string()),
                          ("group", pa.string())])
_ID_FIELDS = [("path", pa.string()), ("label", pa.string()), ("content_id", pa.string()),
              ("file_size", pa.int64()), ("mtime_ns", pa.int64()), ("reason", pa.string()),
              ("transient", pa.bool_())]
RESULT_SCHEMA = pa.schema([f for f in _ID_FIELDS if f[0] != "label"] + [
    ("shard", pa.string()), ("provider", pa.string()), ("fatal_kind", pa.string()), ("fatal", pa.string()),
    ("decode_s", pa.float64()), ("wait_s", pa.float64()), ("infer_s", pa.float64()), ("write_s", pa.float64()),
])


class RayUnavailableError(RuntimeError):
    """``--engine ray`` was asked for but Ray Data is not installed."""


def import_ray():
    """``ray`` with ``ray.data``, or a clear error naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RayUnavailableError(
            f"--engine ray needs Ray Data, which is not installed ({exc}): {INSTALL_HINT}"
        ) from None
    return ray


# ----------------------------------------------------------------------------------------------------------
# Worker side: plain functions and one class, shipped to Ray workers by reference to this module.


def _pixels_array(pixels: np.ndarray) -> pa.Array:
    """(n, S, S, 3) uint8 → fixed_size_binary(S·S·3), zero-copy: plain Arrow, no Ray tensor extension."""
    n = len(pixels)
    width = int(np.prod(pixels.shape[1:]))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(np.ascontiguousarray(pixels))])


def _pixels_numpy(column, size: int) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = size * size * 3
    n = len(arr)
    if n == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    buf = np.frombuffer(arr.buffers()[1], dtype=np.uint8, count=n * width, offset=arr.offset * width)
    return buf.reshape(n, size, size, 3)


def _features_numpy(column, dim: int) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return np.zeros((0, dim), np.float32)
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def decode_block(batch: pa.Table, *, prep: dict, draft: bool) -> pa.Table:
    """A CPU task: read and decode a block of images exactly as the local engine's decode workers do."""
    from stage1_extract.decoding.image import decode_file
    from stage1_extract.model.preprocessing import Preprocessing

    p = Preprocessing.from_dict(prep)
    n = batch.num_rows
    pixels = np.zeros((n, p.input_size, p.input_size, 3), np.uint8)
    reasons, cids, sizes, mtimes, transient = [], [], [], [], []
    t0 = time.perf_counter()
    for i, path in enumerate(batch.column("abspath").to_pylist()):
        got = decode_file(path, p, pixels[i], draft=draft)
        reasons.append(got.reason)
        cids.append(got.content_id)
        sizes.append(got.file_size)
        mtimes.append(got.mtime_ns)
        transient.append(got.transient)
    share = (time.perf_counter() - t0) / max(n, 1)
    return pa.table({
        "path": batch.column("path"),
        "label": batch.column("label"),
        "group": batch.column("group"),
        "content_id": pa.array(cids, pa.string()),
        "file_size": pa.array(sizes, pa.int64()),
        "mtime_ns": pa.array(mtimes, pa.int64()),
        "reason": pa.array(reasons, pa.string()),
        "transient": pa.array(transient, pa.bool_()),
        "decode_s": pa.array(np.full(n, share)),
        "pixels": _pixels_array(pixels),
    })


def _local_model_file(onnx_bytes: bytes, sha256: str) -> str:
    """Write the driver's ONNX bytes once per node (content-addressed, atomic) for ONNX Runtime to load."""
    folder = os.path.join(tempfile.gettempdir(), "hybrid-transfer-ray")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{sha256}.onnx")
    if not os.path.isfile(path) or os.path.getsize(path) != len(onnx_bytes):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(onnx_bytes)
        os.replace(tmp, path)
    return path


class InferenceActor:
    """An actor of the pool: one onnxruntime session, fed uint8 batches; pixels in, features out."""

    def __init__(self, *, model_ref, sha256: str, provider: str, input_size: int, batch_size: int,
                 threads: int | None, precision: str = "fp32", cuda=None) -> None:
        import ray

        from stage1_extract.runtime.session import FeatureSession

        ref = model_ref[0]  # wrapped in a list so that Ray hands us the reference, not a copy per actor start
        onnx_bytes = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
        self.input_size = input_size
        self.session = FeatureSession(_local_model_file(onnx_bytes, sha256), provider=provider,
                                      input_size=input_size, batch_size=batch_size, threads=threads,
                                      precision=precision, cuda=cuda)
        self._idle_since = time.perf_counter()

    def __call__(self, batch: pa.Table) -> pa.Table:
        from stage1_extract.run.lifecycle import nonfinite_message

        n = batch.num_rows
        t0 = time.perf_counter()
        # time this actor sat idle for want of decoded input: the Ray engine's "waiting for decode"
        waited, self._idle_since = t0 - self._idle_since, None
        ok = np.flatnonzero(np.asarray(batch.column("reason").is_null().to_numpy(zero_copy_only=False)))
        pixels = _pixels_numpy(batch.column("pixels"), self.input_size)
        dim = self.session.output_dim
        feats = np.zeros((n, dim), np.float32)
        fatal_kind: list[str | None] = [None] * n
        fatal: list[str | None] = [None] * n
        bs = self.session.batch_size
        for start in range(0, len(ok), bs):
            rows = ok[start:start + bs]
            out = self.session.run(pixels[rows], len(rows))
            msg = nonfinite_message(out, [batch.column("path")[int(r)].as_py() for r in rows])
            if msg:
                for r in rows:
                    fatal_kind[r], fatal[r] = "nonfinite", msg
                continue
            feats[rows] = out
        self._idle_since = time.perf_counter()
        share = (self._idle_since - t0) / max(n, 1)
        flat = pa.array(feats.reshape(-1), pa.float32())
        return batch.drop_columns(["pixels"]).append_column("infer_s", pa.array(np.full(n, share))) \
            .append_column("wait_s", pa.array(np.full(n, waited / max(n, 1)))) \
            .append_column("provider", pa.array([self.session.provider] * n, pa.string())) \
            .append_column("fatal_kind", pa.array(fatal_kind, pa.string())) \
            .append_column("fatal", pa.array(fatal, pa.string())) \
            .append_column("feature", pa.FixedSizeListArray.from_arrays(flat, dim))


def write_block(batch: pa.Table, *, out: str, meta_json: str, stamp: str) -> pa.Table:
    """A task: write the usable rows of a batch as one shard; return one small row per image for the driver."""
    from shardformat import ShardMetadata, write_shard
    from shardformat import shard_name

    n = batch.num_rows
    meta = ShardMetadata.from_json(meta_json)
    usable = pc.and_(batch.column("reason").is_null(), batch.column("fatal").is_null())
    rows = batch.filter(usable)
    shard: str | None = None
    fatal_kind = batch.column("fatal_kind").to_pylist()
    fatal = batch.column("fatal").to_pylist()
    t0 = time.perf_counter()
    if rows.num_rows:
        paths = rows.column("path").to_pylist()
        try:
            shard = write_shard(
                out, shard_name(stamp, paths=paths), meta,
                paths=paths, labels=rows.column("label").to_pylist(), groups=rows.column("group").to_pylist(),
                content_ids=rows.column("content_id").to_pylist(),
                file_sizes=rows.column("file_size").to_numpy(), mtimes_ns=rows.column("mtime_ns").to_numpy(),
                features=_features_numpy(rows.column("feature"), meta.feature_dim),
            )
        except Exception as exc:  # disk full, permissions…: the driver stops the run like the local engine
            msg = f"writing a shard in {out} failed: {exc}"
            mask = usable.to_pylist()
            fatal_kind = ["write" if m else k for m, k in zip(mask, fatal_kind)]
            fatal = [msg if m else f for m, f in zip(mask, fatal)]
    share = (time.perf_counter() - t0) / max(n, 1)
    written = usable.to_pylist()
    return pa.table({
        "path": batch.column("path"),
        "content_id": batch.column("content_id"),
        "file_size": batch.column("file_size"),
        "mtime_ns": batch.column("mtime_ns"),
        "reason": batch.column("reason"),
        "transient": batch.column("transient"),
        "shard": pa.array([shard if w and shard else None for w in written], pa.string()),
        "provider": batch.column("provider"),
        "fatal_kind": pa.array(fatal_kind, pa.string()),
        "fatal": pa.array(fatal, pa.string()),
        "decode_s": batch.column("decode_s"),
        "wait_s": batch.column("wait_s"),
        "infer_s": batch.column("infer_s"),
        "write_s": pa.array(np.full(n, share)),
    }, schema=RESULT_SCHEMA)


# ----------------------------------------------------------------------------------------------------------
# Driver side.


def _connect(ray, address: str | None) -> bool:
    """Use the Ray instance already initialised in this process, or connect/start one; True if we started it."""
    if ray.is_initialized():
        if address:
            log.warning("Ray is already initialised in this process; ignoring --ray-address %s", address)
        return False
    ray.init(address=address or None)
    return True


def _alive_node_cpus(ray) -> list[float]:
    cpus = [float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return [c for c in cpus if c > 0] or [1.0]


def plan_resources(ray, *, provider: str, actors: int | None, threads: int | None, batch_size: int | None):
    """How the inference pool is laid out on this cluster: (actors, num_gpus, num_cpus, threads, batch size, provider)."""
    from stage1_extract.run.lifecycle import default_batch_size
    from stage1_extract.runtime.session import ProviderUnavailableError

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if provider in ("cuda", "tensorrt") and gpus == 0:
        raise ProviderUnavailableError(f"--provider {provider}: the Ray cluster has no GPUs (ray status)")
    if gpus and provider != "cpu":
        n = min(actors or gpus, gpus)
        return n, 1, 1, threads or 2, batch_size or default_batch_size(True), provider
    # CPU only: one actor per node using three quarters of its cores, the rest decodes (model ≈ 8× decode).
    node_cpus = _alive_node_cpus(ray)
    per_actor = threads or max(1, int(min(node_cpus) * 3 // 4))
    per_actor = min(per_actor, max(1, int(min(node_cpus)) - 1)) if min(node_cpus) > 1 else 1
    n = actors or len(node_cpus)
    return n, 0, per_actor, per_actor, batch_size or default_batch_size(False), "cpu"


def _ray_error(exc: BaseException) -> BaseException:
    """The user-facing error inside a Ray task failure: same type as the local engine would raise when built in."""
    import builtins

    text = str(exc)
    found = re.findall(r"^(\w+(?:\.\w+)*): (.*)$", text.split("The above exception was the direct cause")[0],
                       flags=re.MULTILINE)
    if found:
        name, message = found[-1]
        cls = getattr(builtins, name.rsplit(".", 1)[-1], None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                return cls(message)
            except Exception:  # pragma: no cover - an exception type with a special constructor
                pass
        return RuntimeError(f"a Ray task failed: {name}: {message}")
    return RuntimeError(f"a Ray task failed: {text.strip().splitlines()[-1] if text.strip() else type(exc).__name__}")


def _decode_block_rows(n_images: int, total_cpus: float) -> int:
    """About four decode tasks per CPU, each between 8 and MAX_DECODE_BLOCK images."""
    per = -(-n_images // max(1, int(total_cpus * 4)))
    return int(min(MAX_DECODE_BLOCK, max(8, per)))


def _reconcile(out: str, stamp: str, reported: dict[str, list[str]]) -> None:
    """After a finished run: the shards of this run in ``out`` must be exactly the reported ones, each path once."""
    from shardformat import list_shards, resolve
    from stage1_extract.run.lifecycle import plan_on
    from stage1_extract.run.plan import Plan, compact

    present = [s for s in list_shards(out) if os.path.basename(s).startswith(f"part-{stamp}-")]
    missing = sorted(set(reported) - set(present))
    if missing:
        raise RuntimeError(
            f"Ray workers wrote {len(missing)} shard(s) that the driver cannot see in {out} (e.g. {missing[0]}): "
            "with a multi-node cluster --out must be a filesystem every node shares (NFS…) or a URI "
            "such as s3://bucket/features"
        )
    fs, _ = resolve(out)
    for orphan in sorted(set(present) - set(reported)):  # a failed attempt's output; its rows were redone
        log.warning("removing %s: written by a failed attempt of a Ray task", orphan)
        fs.delete_file(orphan)
    owner: dict[str, str] = {}
    stale: dict[str, int] = {}
    keep: dict[str, set[str]] = {s: set(paths) for s, paths in reported.items()}
    for shard in sorted(reported):
        for path in reported[shard]:
            if path in owner:  # the same image in two shards of this run: keep the first
                keep[shard].discard(path)
                stale[shard] = stale.get(shard, 0) + 1
            else:
                owner[path] = shard
    if stale:
        compact(plan_on(out, Plan(todo=[], done=0, known_errors=[], stale_rows=stale,
                                  keep={s: keep[s] for s in stale})))


def extract_ray(
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    ray_address: str | None = None,
    actors: int | None = None,
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
    cuda=None,
):
    """:func:`stage1_extract.extract` on a Ray cluster; same options, same output, same summary.

    ``ray_address``: a running cluster (``auto``, ``HOST:6379`` or ``ray://HOST:10001``); without it the Ray
    instance already initialised in this process is used, else ``RAY_ADDRESS``, else a local one is started
    (and shut down at the end). ``actors``: size of the inference pool (default: one per GPU, or on a CPU-only
    cluster one per node). ``workers``: most decode tasks at once (default: as many as free CPUs allow).
    ``threads``: ONNX Runtime threads per actor (on CPU-only clusters also the CPUs each actor reserves).
    Images must be readable at the same paths on every node; ``out`` is a URI (``s3://``, ``gs://``,
    ``hdfs://``, ``file://``) or a folder every node shares. ``cuda``: the actors' CUDA provider tuning
    (:class:`~stage1_extract.runtime.session.CudaOptions`).
    """
    from stage1_extract.extract import prepare_model
    from stage1_extract.run.lifecycle import list_inputs, open_run
    from stage1_extract.run.writer import ShardWriteError, run_stamp

    if decode != "cpu":
        raise ValueError(f"--engine ray decodes with PIL in CPU tasks; --decode {decode} is for the local engine")
    ray = import_ray()
    t_start = time.perf_counter()
    out, listing = list_inputs(images, out, group_regex=group_regex, dicom_frames=dicom_frames,
                               dicom_group=dicom_group, group_salt=group_salt)
    model = prepare_model(backbone, weights=weights, onnx=onnx, precision=precision, input_size=input_size,
                          resize=resize, mean=mean, std=std, interpolation=interpolation)
    with open_run(listing, out, model, provider=provider, strict=strict, t_start=t_start) as run:
        out, meta, summary, timings = run.out, run.meta, run.summary, run.timings
        if run.todo:
            started = _connect(ray, ray_address)
            ctx = ray.data.DataContext.get_current()
            saved_bars = ctx.enable_progress_bars
            ctx.enable_progress_bars = progress
            try:
                n_actors, gpus, cpus, n_threads, bs, actor_provider = plan_resources(
                    ray, provider=provider, actors=actors, threads=threads, batch_size=batch_size)
                size = model.preprocessing.input_size
                todo = run.todo
                rows_per_block = _decode_block_rows(len(todo), ray.cluster_resources().get("CPU", 1))
                blocks = [
                    pa.table({"path": [r.path for r in chunk], "abspath": [r.abspath for r in chunk],
                              "label": [r.label for r in chunk], "group": [r.group for r in chunk]},
                             schema=ITEMS_SCHEMA)
                    for chunk in (todo[i:i + rows_per_block] for i in range(0, len(todo), rows_per_block))
                ]
                with open(model.onnx_path, "rb") as fh:
                    model_ref = ray.put(fh.read())
                stamp = run_stamp()
                decode_compute = {}
                if workers:
                    decode_compute["compute"] = ray.data.TaskPoolStrategy(size=workers)
                ds = ray.data.from_arrow(blocks)
                ds = ds.map_batches(
                    decode_block, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                    fn_kwargs={"prep": model.preprocessing.to_dict(), "draft": draft}, num_cpus=1,
                    # A memory estimate per task; it also keeps Ray Data from fusing decoding into the actors.
                    memory=int(rows_per_block * size * size * 3 * 2 + 128 * 2**20), **decode_compute,
                )
                ds = ds.map_batches(
                    InferenceActor, batch_format="pyarrow", batch_size=bs, zero_copy_batch=True,
                    fn_constructor_kwargs={"model_ref": [model_ref], "sha256": model.onnx_sha256,
                                           "provider": actor_provider, "input_size": size, "batch_size": bs,
                                           "threads": n_threads, "precision": model.precision, "cuda": cuda},
                    compute=ray.data.ActorPoolStrategy(size=n_actors), num_gpus=gpus, num_cpus=cpus,
                )
                ds = ds.map_batches(
                    write_block, batch_format="pyarrow", batch_size=shard_size, zero_copy_batch=True,
                    fn_kwargs={"out": out, "meta_json": meta.to_json(), "stamp": stamp}, num_cpus=0.25,
                )
                reported: dict[str, list[str]] = {}
                fatal: tuple[str, str] | None = None
                t_loop = time.perf_counter()
                try:
                    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                        for row in batch.to_pylist():
                            timings["decode_worker"] += row["decode_s"] or 0.0
                            timings["wait_decode"] += row["wait_s"] or 0.0
                            timings["infer"] += row["infer_s"] or 0.0
                            timings["write"] += row["write_s"] or 0.0
                            if row["provider"]:
                                summary.provider = row["provider"]
                            if row["fatal"] and fatal is None:
                                fatal = (row["fatal_kind"], row["fatal"])
                            if row["reason"] is not None:
                                run.add_error(*(row[k] for k in ("path", "reason", "content_id", "file_size",
                                                                 "mtime_ns")), transient=row["transient"])
                            elif row["shard"]:
                                reported.setdefault(row["shard"], []).append(row["path"])
                        if fatal or run.stop_for_strict:
                            break
                except ray.exceptions.RayError as exc:
                    raise _ray_error(exc) from exc
                if fatal:
                    kind, message = fatal
                    raise (ShardWriteError if kind == "write" else FloatingPointError)(message)
                loop_seconds = time.perf_counter() - t_loop
                if not run.stop_for_strict:
                    _reconcile(out, stamp, reported)
                run.loop_done(seconds=loop_seconds, extracted=len({p for paths in reported.values() for p in paths}),
                              shards=len(reported))
            finally:
                ctx.enable_progress_bars = saved_bars
                if started:
                    ray.shutdown()
    return summary
