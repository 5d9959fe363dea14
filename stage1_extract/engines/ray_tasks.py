"""The Ray engine's worker side: plain functions and one actor class, shipped to Ray workers by reference.

    decode_block (CPU tasks) ──► InferenceActor (actor pool) ──► write_block (tasks) ──► small rows to the driver
    (decoding.image.decode_file,  (one FeatureSession per       (shardformat.write_shard,
     uint8 pixels)                 actor; 1 GPU each, or CPUs)   atomic, named per run + batch)

Pixels travel as plain Arrow ``fixed_size_binary`` columns (no Ray tensor extension); features as fixed-size
lists. The driver (:mod:`stage1_extract.engines.ray_driver`) builds the dataset from these.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ITEMS_SCHEMA = pa.schema([("path", pa.string()), ("abspath", pa.string()), ("label", pa.string()),
                          ("group", pa.string())])
_ID_FIELDS = [("path", pa.string()), ("label", pa.string()), ("content_id", pa.string()),
              ("file_size", pa.int64()), ("mtime_ns", pa.int64()), ("reason", pa.string()),
              ("transient", pa.bool_())]
RESULT_SCHEMA = pa.schema([f for f in _ID_FIELDS if f[0] != "label"] + [
    ("shard", pa.string()), ("provider", pa.string()), ("fatal_kind", pa.string()), ("fatal", pa.string()),
    ("decode_s", pa.float64()), ("wait_s", pa.float64()), ("infer_s", pa.float64()), ("write_s", pa.float64()),
])



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
