"""Incremental planning: what is already extracted, what must be (re)done, which old rows must go.

A listed file is *done* when a shard row has its path, label and group and the file is unchanged: same size and
mtime, or — when only the mtime moved — the same content hash. Among several valid rows for a path (a run
killed between writing a new shard and compacting old ones) the newest shard wins. Every other row is
*stale* and is removed by :func:`compact` once the run has finished, which restores exactly-once.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from stage1_extract.decode import content_id
from stage1_extract.sources import ImageRecord


@dataclasses.dataclass
class Plan:
    todo: list[ImageRecord]
    done: int
    known_errors: list[dict]  # carried forward from the last run: same file, same failure
    stale_rows: dict[str, int]  # shard file → number of rows to drop
    keep: dict[str, set[str]]  # shard file → paths to keep (only for shards with stale rows)


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _hash_file(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return content_id(fh.read())
    except OSError:
        return None


def make_plan(records: list[ImageRecord], index: pa.Table, errors: list[dict]) -> Plan:
    by_path = {r.path: r for r in records}
    stats = {}
    rows_by_path: dict[str, list[dict]] = defaultdict(list)
    for row in index.to_pylist():
        rows_by_path[row["path"]].append(row)

    kept_shard: dict[str, str] = {}
    for path, rows in rows_by_path.items():
        rec = by_path.get(path)
        if rec is None:
            continue
        st = stats.setdefault(path, _stat(rec.abspath))
        if st is None:
            continue
        digest = None
        for row in sorted(rows, key=lambda r: r["shard"], reverse=True):
            if row["label"] != rec.label or row.get("group") != rec.group or row["file_size"] != st[0]:
                continue
            if row["mtime_ns"] != st[1]:
                digest = digest or _hash_file(rec.abspath)
                if digest != row["content_id"]:
                    continue
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
        if rec is None or rec.path in kept_shard or rec.path in known_paths:
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
    )


def compact(plan: Plan) -> int:
    """Rewrite (atomically) or delete every shard that holds stale rows; return the rows removed."""
    import pyarrow.parquet as pq

    from shardformat import atomic_write_table, resolve

    removed = 0
    for shard, n_stale in sorted(plan.stale_rows.items()):
        fs, full = resolve(shard)
        keep = plan.keep.get(shard, set())
        if not keep:
            fs.delete_file(full)
            removed += n_stale
            continue
        with fs.open_input_file(full) as fh:
            table = pq.read_table(fh)
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
