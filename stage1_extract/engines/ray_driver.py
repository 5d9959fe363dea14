"""Stage 1 on a Ray cluster (``stage1-extract --engine ray``): the same shards, errors and summary as the
local engine, with the work spread over Ray Data.

    image list (driver) ──► decode: CPU tasks ──► inference: actor pool ──► shard writes: tasks ──► small rows
                             (the tasks and the actor: :mod:`stage1_extract.engines.ray_tasks`)     back to the driver

The run's start and end (list, lock, plan; errors, compaction, ``run.json``) are the runner's
(:mod:`stage1_extract.engines.runner`), as for the local engine: :class:`RayEngine` only processes the planned
images. Only small per-image rows (path, reason, shard, timings) come back to the driver; pixels and features
stay in Ray's object store.

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
import time

import pyarrow as pa

from stage1_extract.engines.ray_tasks import ITEMS_SCHEMA, InferenceActor, decode_block, write_block
from stage1_extract import errors as stage1_errors
from stage1_extract.errors import NonFiniteFeaturesError, OptionError, Stage1Error
from stage1_extract.options import ExtractOptions

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install hybrid-transfer[ray]"
#: images per decode task (upper bound); small enough to spread a modest collection over every CPU
MAX_DECODE_BLOCK = 256

class RayUnavailableError(Stage1Error, RuntimeError):
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
        short = name.rsplit(".", 1)[-1]
        # stage 1's generic errors (OptionError: a ValueError…) come back as themselves, like the built-in ones
        cls = getattr(builtins, short, None) or getattr(stage1_errors, short, None)
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


class RayEngine:
    """Processes a run's planned images on a Ray cluster (connecting to it, or starting a local one).

    ``ray_address``: a running cluster (``auto``, ``HOST:6379`` or ``ray://HOST:10001``); without it the Ray
    instance already initialised in this process is used, else ``RAY_ADDRESS``, else a local one is started
    (and shut down at the end). ``actors``: size of the inference pool (default: one per GPU, or on a CPU-only
    cluster one per node). ``workers``: most decode tasks at once (default: as many as free CPUs allow).
    ``threads``: ONNX Runtime threads per actor (on CPU-only clusters also the CPUs each actor reserves).
    """

    def __init__(self, options: ExtractOptions) -> None:
        if options.decode != "cpu":
            raise OptionError(f"--engine ray decodes with PIL in CPU tasks; --decode {options.decode} is for the "
                             "local engine")
        self.options = options
        self.ray = import_ray()

    def process(self, run, model) -> None:
        ray = self.ray
        started = _connect(ray, self.options.ray_address)
        ctx = ray.data.DataContext.get_current()
        saved_bars = ctx.enable_progress_bars
        ctx.enable_progress_bars = self.options.progress
        try:
            from stage1_extract.run.writer import run_stamp

            stamp = run_stamp()
            reported = self._collect(run, self._dataset(run, model, stamp))
            if not run.stop_for_strict:
                _reconcile(run.out, stamp, reported)
        finally:
            ctx.enable_progress_bars = saved_bars
            if started:
                ray.shutdown()

    def _dataset(self, run, model, stamp: str):
        """decode tasks → inference actors → shard-writing tasks, over the run's planned images."""
        ray, o = self.ray, self.options
        n_actors, gpus, cpus, n_threads, bs, actor_provider = plan_resources(
            ray, provider=o.provider, actors=o.actors, threads=o.threads, batch_size=o.batch_size)
        size = model.preprocessing.input_size
        todo = run.todo
        rows_per_block = _decode_block_rows(len(todo), ray.cluster_resources().get("CPU", 1))
        blocks = [
            pa.table({"path": [r.path for r in chunk], "abspath": [r.abspath for r in chunk],
                      "label": [r.label for r in chunk], "group": [r.group for r in chunk]}, schema=ITEMS_SCHEMA)
            for chunk in (todo[i:i + rows_per_block] for i in range(0, len(todo), rows_per_block))
        ]
        with open(model.onnx_path, "rb") as fh:
            model_ref = ray.put(fh.read())
        decode_compute = {}
        if o.workers:
            decode_compute["compute"] = ray.data.TaskPoolStrategy(size=o.workers)
        ds = ray.data.from_arrow(blocks)
        ds = ds.map_batches(
            decode_block, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
            fn_kwargs={"prep": model.preprocessing.to_dict(), "draft": o.draft}, num_cpus=1,
            # A memory estimate per task; it also keeps Ray Data from fusing decoding into the actors.
            memory=int(rows_per_block * size * size * 3 * 2 + 128 * 2**20), **decode_compute,
        )
        ds = ds.map_batches(
            InferenceActor, batch_format="pyarrow", batch_size=bs, zero_copy_batch=True,
            fn_constructor_kwargs={"model_ref": [model_ref], "sha256": model.onnx_sha256,
                                   "provider": actor_provider, "input_size": size, "batch_size": bs,
                                   "threads": n_threads, "precision": model.precision, "cuda": o.cuda},
            compute=ray.data.ActorPoolStrategy(size=n_actors), num_gpus=gpus, num_cpus=cpus,
        )
        return ds.map_batches(
            write_block, batch_format="pyarrow", batch_size=o.shard_size, zero_copy_batch=True,
            fn_kwargs={"out": run.out, "meta_json": run.meta.to_json(), "stamp": stamp}, num_cpus=0.25,
        )

    def _collect(self, run, ds) -> dict[str, list[str]]:
        """Run the dataset, feeding the run each image's outcome; the shards written, with their paths."""
        from stage1_extract.run.writer import ShardWriteError

        timings, summary = run.timings, run.summary
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
                        run.add_error(*(row[k] for k in ("path", "reason", "content_id", "file_size", "mtime_ns")),
                                      transient=row["transient"])
                    elif row["shard"]:
                        reported.setdefault(row["shard"], []).append(row["path"])
                if fatal or run.stop_for_strict:
                    break
        except self.ray.exceptions.RayError as exc:
            raise _ray_error(exc) from exc
        if fatal:
            kind, message = fatal
            raise (ShardWriteError if kind == "write" else NonFiniteFeaturesError)(message)
        run.loop_done(seconds=time.perf_counter() - t_loop,
                      extracted=len({p for paths in reported.values() for p in paths}), shards=len(reported))
        return reported
