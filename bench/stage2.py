#!/usr/bin/env python3
"""Stage-2 benchmark: shard loading throughput and training time of the default head.

In one run, on synthetic vectors written as real shards (50,000 × 2048 float32 by default, 11 classes):
1. shard loading through ``shardformat.read_features`` (page-cache warm) against a baseline measured in
   the same run: ``pyarrow.parquet.read_table`` plus the per-row ``to_pylist`` conversion most code does;
2. training the default head for a fixed number of epochs (early stopping off), also with a 512-unit head.

Writes bench/results/stage2-cpu.json. Targets (issue): load ≥ 1 GB/s; default head, 50k × 2048,
20 epochs < 30 s on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("KERAS_BACKEND", "torch")


def write_shards(directory: Path, n: int, dim: int, classes: int, rows_per_shard: int, seed: int) -> None:
    import shardformat

    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, size=(classes, dim)).astype(np.float32)
    meta = shardformat.ShardMetadata("bench_synthetic", "none", "0" * 64, {"input_size": 0}, dim)
    for s, start in enumerate(range(0, n, rows_per_shard)):
        m = min(rows_per_shard, n - start)
        y = rng.integers(0, classes, m)
        x = centres[y] + rng.normal(0, 3, size=(m, dim)).astype(np.float32)
        shardformat.write_shard(directory, f"part-bench-{s:05d}.parquet", meta,
                                paths=[f"img_{start + i:07d}.jpg" for i in range(m)],
                                labels=[f"class_{k:02d}" for k in y], content_ids=["x"] * m,
                                file_sizes=[0] * m, mtimes_ns=[0] * m, features=x)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--classes", type=int, default=11)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="loading: best of N")
    p.add_argument("--out-json", default=str(Path(__file__).parent / "results" / "stage2-cpu.json"))
    args = p.parse_args(argv)

    import pyarrow.parquet as pq

    import shardformat
    from stage2_classify.data import load_dataset, stratified_split
    from stage2_classify.train import TrainOptions, fit_head

    with tempfile.TemporaryDirectory(prefix="bench-stage2-") as tmp:
        shards = Path(tmp) / "shards"
        write_shards(shards, args.rows, args.dim, args.classes, 8192, seed=0)
        nbytes = args.rows * args.dim * 4
        shardformat.read_features(shards)  # warm the page cache

        def naive():
            t = pq.read_table(shards)
            np.asarray(t.column("feature").to_pylist(), dtype=np.float32)

        load_s = best_of(lambda: shardformat.read_features(shards), args.repeats)
        naive_s = best_of(naive, 1)
        ds = load_dataset(shards)
        split = stratified_split(ds.labels, seed=0)
        results = {}
        for hidden in ((256,), (512,)):
            opts = TrainOptions(hidden=hidden, epochs=args.epochs, patience=args.epochs + 1)
            fitted = fit_head(ds, split, opts, verbose=0)
            results["x".join(map(str, hidden))] = {
                "seconds": round(fitted.seconds, 2), "epochs": len(fitted.history["loss"]),
                "val_accuracy": round(fitted.history["val_accuracy"][-1], 4),
            }

    import keras
    import torch

    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "keras": keras.__version__,
                     "torch": torch.__version__, "pyarrow": __import__("pyarrow").__version__},
        "data": {"rows": args.rows, "dim": args.dim, "classes": args.classes, "bytes": nbytes,
                 "train_rows": int(len(split["train"]))},
        "load": {"read_features_seconds": round(load_s, 4), "read_features_GBps": round(nbytes / load_s / 1e9, 3),
                 "naive_to_pylist_seconds": round(naive_s, 3), "speedup_vs_naive": round(naive_s / load_s, 1)},
        "train": results,
        "targets": {"load_GBps_min": 1.0, "default_head_20_epochs_max_seconds": 30},
    }
    os.makedirs(os.path.dirname(args.out_json), exist_ok=True)
    Path(args.out_json).write_text(json.dumps(report, indent=1))
    print(f"shard loading   {report['load']['read_features_GBps']:.2f} GB/s "
          f"({load_s:.3f}s for {nbytes / 1e6:.0f} MB; naive to_pylist {naive_s:.2f}s → {naive_s / load_s:.0f}× faster)")
    for name, r in results.items():
        print(f"train hidden={name:4s} {r['epochs']} epochs on {len(split['train'])} rows: {r['seconds']:.1f}s "
              f"(val acc {r['val_accuracy']:.3f})")
    print(f"targets: load ≥ 1 GB/s, default head (256) < 30 s → written {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
