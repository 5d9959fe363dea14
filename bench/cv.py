#!/usr/bin/env python3
"""Cross-validation benchmark: ``stage2_classify.cross_validate`` on synthetic vectors written as shards.

Default (small, ~1 min): 10,000 × 1,280 vectors, 10 classes, 5 folds, the default linear head; with
``--full`` the issue's case, 50,000 × 1,280. In the same run, as baselines on the same data and folds:
scikit-learn's ``LogisticRegression`` (lbfgs) on one fold, and the Keras training head (``head="train"``)
on one fold; their per-fold time × 5 is what a 5-fold CV with them would cost. ``--skip-baselines`` skips
them. The machine's load average is recorded: on a shared machine wall time grows with other work.
Writes bench/results/cv-cpu[-full].json. Target (issue): 5 folds on 50,000 × 1,280 well under a minute.
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
import stage2_classify  # noqa: E402  (sets KERAS_BACKEND=torch and OMP_WAIT_POLICY before torch loads)


def write_shards(directory: Path, n: int, dim: int, classes: int, seed: int = 0) -> None:
    """Overlapping Gaussian clusters (so the heads have work to do: ~85% accuracy, not 100%)."""
    import shardformat

    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 0.06, size=(classes, dim)).astype(np.float32)
    meta = shardformat.ShardMetadata("bench_synthetic", "none", "0" * 64, {"input_size": 0}, dim)
    for s, start in enumerate(range(0, n, 8192)):
        m = min(8192, n - start)
        y = rng.integers(0, classes, m)
        x = centres[y] + rng.normal(0, 1, size=(m, dim)).astype(np.float32)
        shardformat.write_shard(directory, f"part-bench-{s:05d}.parquet", meta,
                                paths=[f"c{k:02d}/img_{start + i:07d}.jpg" for i, k in enumerate(y)],
                                labels=[f"c{k:02d}" for k in y], content_ids=[f"id-{start + i}" for i in range(m)],
                                file_sizes=[0] * m, mtimes_ns=[0] * m, features=x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="50,000 vectors (the issue's case) instead of 10,000")
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--skip-baselines", action="store_true")
    args = p.parse_args(argv)
    rows = args.rows or (50_000 if args.full else 10_000)
    from stage2_classify import cross_validate, load_dataset

    result: dict = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "loadavg_1min_before": os.getloadavg()[0]},
                    "rows": rows, "dim": args.dim, "classes": args.classes, "folds": args.folds}
    with tempfile.TemporaryDirectory(prefix="bench-cv-") as tmp:
        shards = Path(tmp) / "shards"
        write_shards(shards, rows, args.dim, args.classes)
        t0 = time.perf_counter()
        ds = load_dataset(shards)
        result["load_seconds"] = round(time.perf_counter() - t0, 2)
        t0, c0 = time.perf_counter(), time.process_time()
        cv = cross_validate(ds, Path(tmp) / "cv", folds=args.folds, head="fast-linear", progress=False)
        result["linear_cv"] = {"seconds": round(time.perf_counter() - t0, 2),
                               "cpu_seconds": round(time.process_time() - c0, 2),
                               "fit_seconds": round(cv.seconds, 2),
                               "accuracy_mean": round(cv.summary["accuracy"]["mean"], 4),
                               "macro_f1_mean": round(cv.summary["macro_f1"]["mean"], 4),
                               "log_loss_mean": round(cv.summary["log_loss"]["mean"], 4)}
        print(f"linear head, {args.folds}-fold CV on {rows} x {args.dim}: {result['linear_cv']['seconds']}s "
              f"(accuracy {cv.summary['accuracy']['mean']:.3f})", flush=True)
        if not args.skip_baselines:
            result["baselines_one_fold"] = baselines(ds, cv.oof["fold"].to_numpy())
        result["machine"]["loadavg_1min_after"] = os.getloadavg()[0]
    out = Path(__file__).parent / "results" / f"cv-cpu{'-full' if args.full else ''}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {out}")
    return 0


def baselines(ds, fold: np.ndarray) -> dict:
    """One fold of each alternative head on the same rows; ×folds is its CV cost."""
    import warnings

    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score

    from stage2_classify.training.cv import fit_keras_fold as _fit_keras_fold
    from stage2_classify.training.linear import fit_linear
    from stage2_classify.options import TrainOptions
    from stage2_classify.training.fit import column_stats

    train_rows, held = np.flatnonzero(fold != 0), np.flatnonzero(fold == 0)
    out = {}
    t0, c0 = time.perf_counter(), time.process_time()
    head = fit_linear(ds.features[train_rows], ds.y[train_rows], len(ds.classes))
    acc = accuracy_score(ds.y[held], head.predict_proba(ds.features[held]).argmax(1))
    out["linear_cold_start"] = {"seconds": round(time.perf_counter() - t0, 2),
                                "cpu_seconds": round(time.process_time() - c0, 2), "accuracy": round(acc, 4),
                                "iterations": head.iterations}
    print(f"one fold, linear head from zero: {out['linear_cold_start']}", flush=True)
    mean, var = column_stats(ds.features[train_rows])
    scale = np.sqrt(np.maximum(var, 1e-12)).astype(np.float32)
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lr = LogisticRegression(max_iter=200).fit((ds.features[train_rows] - mean) / scale, ds.y[train_rows])
    acc = accuracy_score(ds.y[held], lr.predict((ds.features[held] - mean) / scale))
    out["sklearn_logistic_regression"] = {"seconds": round(time.perf_counter() - t0, 2),
                                          "cpu_seconds": round(time.process_time() - c0, 2), "accuracy": round(acc, 4),
                                          "iterations": int(lr.n_iter_[0])}
    print(f"one fold, sklearn LogisticRegression: {out['sklearn_logistic_regression']}", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    proba = _fit_keras_fold(ds, train_rows, held, TrainOptions())
    out["keras_training_head"] = {"seconds": round(time.perf_counter() - t0, 2),
                                  "cpu_seconds": round(time.process_time() - c0, 2),
                                  "accuracy": round(accuracy_score(ds.y[held], proba.argmax(1)), 4)}
    print(f"one fold, Keras training head (Dense 256, early stopping): {out['keras_training_head']}", flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
