"""Synthetic feature shards (Gaussian clusters) for tests, benchmarks and trying stage 2 without images.

They are real shards, written with ``shardformat.write_shard``, so everything downstream runs as on stage 1's.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np

import shardformat
from shardformat import ShardMetadata


def synthetic_metadata(dim: int, backbone: str = "synthetic") -> ShardMetadata:
    return ShardMetadata(backbone=backbone, weights_id="synthetic:none", onnx_sha256="0" * 64,
                         preprocessing={"input_size": 0}, feature_dim=dim)


def write_synthetic_shards(directory: str | os.PathLike, counts: Sequence[int] = (40, 40, 40), *, dim: int = 16,
                           spread: float = 3.0, noise: float = 1.0, unlabelled: int = 0, shards: int = 2,
                           seed: int = 0, backbone: str = "synthetic", prefix: str = "part-synthetic",
                           feature_dtype: str = "float32") -> Path:
    """Write one Gaussian cluster per class (``counts[k]`` rows named ``class_k``) plus ``unlabelled`` rows
    with a null label, shuffled across ``shards`` files. Paths look like ``class_k/img_00012.png``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, spread, size=(len(counts), dim))
    feats, labels = [], []
    for k, n in enumerate(counts):
        feats.append(centres[k] + rng.normal(0, noise, size=(n, dim)))
        labels += [f"class_{k}"] * n
    feats.append(rng.normal(0, spread, size=(unlabelled, dim)))
    labels += [None] * unlabelled
    x = np.concatenate(feats).astype(np.float32)
    paths = [f"{label or 'unlabelled'}/img_{i:05d}.png" for i, label in enumerate(labels)]
    # Like stage 1's content hash: the same vector is the same "image", different vectors never collide.
    content = [f"{len(row)}-{hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest()}" for row in x]
    meta = ShardMetadata(**{**synthetic_metadata(dim, backbone).__dict__, "feature_dtype": feature_dtype})
    for s, idx in enumerate(np.array_split(rng.permutation(len(x)), shards)):
        shardformat.write_shard(directory, f"{prefix}-{s:05d}.parquet", meta,
                                paths=[paths[i] for i in idx], labels=[labels[i] for i in idx],
                                content_ids=[content[i] for i in idx], file_sizes=[1] * len(idx),
                                mtimes_ns=[0] * len(idx), features=x[idx])
    return Path(directory)
