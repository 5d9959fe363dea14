"""Incremental planning: what is already extracted, what must be (re)done, which old rows must go.

A listed file is *done* when a shard row has its path, label and group and the file is unchanged: same size and
mtime, or — when only the mtime moved — the same content hash. Among several valid rows for a path (a run
killed between writing a new shard and compacting old ones) the newest shard wins. Every other row is
*stale* and is removed by :func:`compact` once the run has finished, which restores exactly-once.

A file whose mtime moved but whose content is unchanged (``touch``, a copy that did not keep times) is
hashed once: :func:`compact` then stores its new mtime, so the next run finds it unchanged without
reading it. Errors are carried forward only when they belong to the file (cannot decode, truncated, too
large); transient ones (out of memory, I/O errors, a killed worker) are retried by the next run.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from stage1_extract.decoding.files import content_id, split_frame_ref
from stage1_extract.inputs.records import ImageRecord


@dataclasses.dataclass
class Plan:
    todo: list[ImageRecord]
    done: int
    known_errors: list[dict]  # carried forward from the last run: same file, same failure
    stale_rows: dict[str, int]  # shard file → number of rows to drop
    keep: dict[str, set[str]]  # shard file → paths to keep (only for shards with stale rows)
    # shard file → {path: current mtime_ns} for rows whose file was touched but found unchanged by its hash
    refresh_mtime: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(split_frame_ref(path)[0])  # one frame of a multi-frame DICOM: its file
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _hash_file(path: str) -> str | None:
    try:
        with open(split_frame_ref(path)[0], "rb") as fh:
            return content_id(fh.read())
    except OSError:
        return None


def make_plan(records: list[ImageRecord], index: pa.Table, errors: list[dict],
              broken: frozenset[tuple[str, str]] = frozenset()) -> Plan:
    """``broken``: (shard, path) rows whose vectors are not finite; never kept, so the image is extracted again."""
    by_path = {r.path: r for r in records}
    stats = {}
    rows_by_path: dict[str, list[dict]] = defaultdict(list)
    for row in index.to_pylist():
        rows_by_path[row["path"]].append(row)

    kept_shard: dict[str, str] = {}
    refresh: dict[str, dict[str, int]] = defaultdict(dict)
    for path, rows in rows_by_path.items():
        rec = by_path.get(path)
        if rec is None:
            continue
        st = stats.setdefault(path, _stat(rec.abspath))
        if st is None:
            continue
        digest = None
        for row in sorted(rows, key=lambda r: r["shard"], reverse=True):
            if (row["label"] != rec.label or row.get("group") != rec.group or row["file_size"] != st[0]
                    or (row["shard"], path) in broken):
                continue
            if row["mtime_ns"] != st[1]:
                digest = digest or _hash_file(rec.abspath)
                if digest != row["content_id"]:
                    continue
                refresh[row["shard"]][path] = st[1]
            kept_shard[path] = row["shard"]
            break

    stale: dict[str, int] = defaultdict(int)
    keep: dict[str, set[str]] = defaultdict(set)
    for path, rows in rows_by_path.items():
        for row in rows:
            if kept_shard.get(path) == row["shard"]:
                keep[row["shard"]].add(path)
            else:
                stale[row["shard"]] += 1

    known = []
    known_paths = set()
    for err in errors:
        rec = by_path.get(err.get("path"))
        if rec is None or rec.path in kept_shard or rec.path in known_paths or err.get("transient"):
            continue
        st = stats.setdefault(rec.path, _stat(rec.abspath))
        if st is not None and (err.get("file_size"), err.get("mtime_ns")) == st:
            known.append(err)
            known_paths.add(rec.path)

    todo = [r for r in records if r.path not in kept_shard and r.path not in known_paths]
    return Plan(
        todo=todo,
        done=len(kept_shard),
        known_errors=known,
        stale_rows=dict(stale),
        keep={s: keep.get(s, set()) for s in stale},
        refresh_mtime=dict(refresh),
    )


def nonfinite_rows(out: str, index: pa.Table) -> frozenset[tuple[str, str]]:
    """(shard, path) of every row whose feature vector holds NaN or infinity (a damaged shard, or one from a
    run before stage 1 checked its output), or whose shard fails its page checksums (bit flips): stage 2
    refuses them, so a rerun must extract them again (and :func:`compact` then deletes the damaged shard)."""
    import logging

    import numpy as np
    import pyarrow.parquet as pq

    from shardformat import resolve

    broken = set()
    fs, root = resolve(out)
    for shard in sorted(set(index.column("shard").to_pylist())) if index.num_rows else []:
        try:
            with fs.open_input_file(f"{root}/{shard.rsplit('/', 1)[-1]}") as fh:
                table = pq.read_table(fh, columns=["path", "feature"], page_checksum_verification=True)
        except (pa.ArrowInvalid, OSError) as exc:
            logging.getLogger(__name__).warning("%s is damaged (%s): its images are extracted again", shard, exc)
            rows = pc.equal(index.column("shard"), shard)
            broken.update((shard, p) for p in index.filter(rows).column("path").to_pylist())
            continue
        feature = table.column("feature").combine_chunks()
        values = feature.flatten().to_numpy(zero_copy_only=False)
        ok = np.isfinite(values.reshape(len(feature), -1)).all(axis=1) if len(feature) else np.ones(0, bool)
        if not ok.all():
            paths = table.column("path").to_pylist()
            broken.update((shard, paths[i]) for i in np.flatnonzero(~ok))
    return frozenset(broken)


def compact(plan: Plan) -> int:
    """Rewrite (atomically) or delete every shard that holds stale rows, and store the refreshed mtimes;
    return the rows removed."""
    import pyarrow.parquet as pq

    from shardformat import atomic_write_table, resolve

    removed = 0
    for shard in sorted(set(plan.stale_rows) | set(plan.refresh_mtime)):
        n_stale = plan.stale_rows.get(shard, 0)
        fs, full = resolve(shard)
        keep = plan.keep.get(shard, set())
        if n_stale and not keep:
            fs.delete_file(full)
            removed += n_stale
            continue
        with fs.open_input_file(full) as fh:
            table = pq.read_table(fh)
        table = _with_mtimes(table, plan.refresh_mtime.get(shard, {}))
        if not n_stale:
            atomic_write_table(table, fs, full)
            continue
        mask = pc.is_in(table.column("path"), value_set=pa.array(sorted(keep), pa.string()))
        # A path can appear twice in one shard only if the shard was written twice; keep the first.
        filtered = table.filter(mask)
        if filtered.num_rows != len(keep):
            seen, idx = set(), []
            for i, p in enumerate(filtered.column("path").to_pylist()):
                if p not in seen:
                    seen.add(p)
                    idx.append(i)
            filtered = filtered.take(pa.array(idx))
        removed += table.num_rows - filtered.num_rows
        atomic_write_table(filtered, fs, full)
    return removed


def _with_mtimes(table: pa.Table, mtimes: dict[str, int]) -> pa.Table:
    """``table`` with the ``mtime_ns`` of the given paths replaced (schema and its metadata unchanged)."""
    if not mtimes:
        return table
    current = table.column("mtime_ns").to_pylist()
    paths = table.column("path").to_pylist()
    values = pa.array([mtimes.get(p, m) for p, m in zip(paths, current)], pa.int64())
    i = table.schema.get_field_index("mtime_ns")
    return table.set_column(i, table.schema.field(i), values)
