"""What a trained run can predict on, turned into feature vectors: images (one file, a folder, a file list or
a Python list of paths), a shard directory, or vectors already in memory.

Images go through stage 1's public ``stage1_extract.extract`` with the backbone the run was trained on,
into a feature cache kept per backbone (``$HYBRID_TRANSFER_CACHE/features/<backbone>-<key>/<input>/``,
default ``~/.cache/hybrid-transfer``). Extraction is incremental, so predicting again on the same folder
costs only the classifier; a changed image is extracted again, a removed one dropped. One image or a list
of paths is written as a small file list in its cache folder, because stage 1 reads folders and lists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path

import numpy as np

import shardformat
from hybrid_common import renamed_keywords
from shardformat import ShardMetadata
from stage2_classify.errors import DatasetError

IMAGE_LIST_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet")
#: how long a prediction waits for another one extracting into the same feature cache (stage 1's lock_wait)
CACHE_LOCK_WAIT_S = 600.0


@dataclasses.dataclass
class Resolved:
    """One row per input: ``paths`` as the caller gave them; ``features`` for the usable rows only."""

    paths: list[str | None]
    labels: list[str | None]
    ok: np.ndarray  # (n,) bool: a vector exists for this row
    features: np.ndarray  # (ok.sum(), D) float32, in row order
    errors: list[str | None]  # why a row has no vector
    features_dir: str | None = None  # where the vectors were cached (image inputs)


def cache_root() -> Path:
    """Same root as stage 1's export cache: ``$HYBRID_TRANSFER_CACHE`` or ``~/.cache/hybrid-transfer``."""
    root = os.environ.get("HYBRID_TRANSFER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                    "hybrid-transfer")
    return Path(root)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def is_shard_dir(source) -> bool:
    """A URI, or a local folder holding ``part-*.parquet`` shards, is read as shards rather than images."""
    text = os.fspath(source)
    if "://" in text:
        return True
    return Path(text).is_dir() and any(Path(text).glob(f"{shardformat.SHARD_PREFIX}*.parquet"))


def from_features(features: np.ndarray, metadata: ShardMetadata) -> Resolved:
    x = np.asarray(features, np.float32)
    if x.ndim != 2 or x.shape[1] != metadata.feature_dim:
        raise ValueError(f"expected (n, {metadata.feature_dim}) feature vectors from {metadata.backbone}, "
                         f"got an array of shape {x.shape}")
    n = len(x)
    return Resolved([None] * n, [None] * n, np.ones(n, bool), x, [None] * n)


def from_shards(shards, metadata: ShardMetadata) -> Resolved:
    fs = shardformat.read_features(shards, expect=metadata)
    if len(fs) == 0 or fs.metadata is None:
        raise DatasetError(f"{os.fspath(shards)}: no feature shards (part-*.parquet) found; "
                           f"run stage1-extract --out {os.fspath(shards)} first")
    n = len(fs)
    return Resolved(fs.paths.tolist(), fs.labels.tolist(), np.ones(n, bool), fs.features, [None] * n,
                    os.fspath(shards))


def _image_list_entry(paths: list[str], cache: Path) -> tuple[Path, dict[str, str]]:
    """A cache folder holding ``images.csv`` (absolute paths) for loose image files; absolute → as given.

    A missing file or a folder stays in the list: stage 1 records it ("listed file does not exist", "is a
    directory") and it comes back as an error row, exactly as when the CLI is given the same list."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    absolute = {}
    for given in paths:
        absolute.setdefault(os.path.abspath(Path(given).expanduser()), given)
    if absolute and not any(os.path.exists(p) for p in absolute):
        shown = ", ".join(list(absolute.values())[:3]) + (" …" if len(absolute) > 3 else "")
        raise FileNotFoundError(f"none of the {len(absolute)} image file(s) exists: {shown}")
    entry = cache / f"files-{_digest(chr(0).join(sorted(absolute)))}"
    entry.mkdir(parents=True, exist_ok=True)
    listing = entry / "images.csv"
    table = pa.table({"path": pa.array(sorted(absolute), pa.string())})
    shardformat.atomic_write_via_path(listing, lambda tmp: pacsv.write_csv(table, tmp))
    return listing, absolute


@renamed_keywords(features_dir="features")
def from_images(images, metadata: ShardMetadata, *, features=None, weights=None, onnx=None,
                progress: bool = True, extract_fn=None, **stage1_options) -> Resolved:
    """Extract (or find cached) vectors for image inputs with the run's own backbone, one row per image.

    ``features``: the feature folder to extract them into (default: the per-backbone cache)."""
    if extract_fn is None:
        from stage1_extract import extract as extract_fn

    by_backbone = cache_root() / "features" / f"{_slug(metadata.backbone)}-{metadata.compatibility_key()}"
    as_list = isinstance(images, (list, tuple))
    given = [os.fspath(p) for p in images] if as_list else os.fspath(images)
    source_path = None if as_list else Path(given).expanduser()
    if source_path is not None and not source_path.exists():
        raise FileNotFoundError(f"{given}: no such image, folder or file list")
    loose = as_list or (source_path.is_file() and source_path.suffix.lower() not in IMAGE_LIST_SUFFIXES)
    if loose:
        listing, to_given = _image_list_entry(given if as_list else [given], by_backbone)
        source, key = listing, listing.parent.name
    else:
        source, key, to_given = source_path, f"{'list' if source_path.is_file() else 'folder'}-" \
            f"{_digest(os.path.realpath(source_path))}", None
    out = Path(features) if features else by_backbone / key / "features"
    backbone = None if metadata.backbone.startswith("onnx:") else metadata.backbone
    if metadata.provenance.get("kind") == "finetuned":  # a fine-tuned run's own backbone (stage 1 --backbone-from)
        stage1_options["backbone_from"] = os.fspath(weights or metadata.provenance.get("directory"))
        backbone = weights = None
    elif backbone is not None:  # the resolution the vectors were made at
        stage1_options.setdefault("input_size", metadata.preprocessing.get("input_size"))
        stage1_options.setdefault("resize", metadata.preprocessing.get("resize"))
    if backbone is None and onnx is None and "backbone_from" not in stage1_options:
        raise ValueError(f"the model was trained on vectors of a user ONNX model ({metadata.backbone}); "
                         "pass the same file (onnx=... / --onnx FILE) to predict on images")
    extra = {}
    if onnx is not None:
        prep = metadata.preprocessing
        # the preprocessing the run's vectors were made with (mean/std are stored on the 0-255 scale)
        extra = dict(input_size=prep.get("input_size"), resize=prep.get("resize"),
                     interpolation=prep.get("interpolation"), mean=tuple(m / 255 for m in prep["mean"]),
                     std=tuple(s / 255 for s in prep["std"]))
    # the cache is shared: a second prediction on the same images waits for the first (then finds them done)
    stage1_options.setdefault("lock_wait", CACHE_LOCK_WAIT_S)
    extract_fn(os.fspath(source), os.fspath(out), backbone=backbone, weights=weights, onnx=onnx, progress=progress,
               **extra, **stage1_options)
    fs = shardformat.read_features(out, expect=metadata)
    errors = _read_errors(out)
    return _rows(given, source_path, loose, to_given, fs, errors, os.fspath(out))


def _read_errors(out: Path) -> dict[str, str]:
    from shardformat import read_errors

    return {row["path"]: row["reason"] for row in read_errors(out)}


def _rows(given, source_path, loose: bool, to_given, fs, errors: dict[str, str], out: str) -> Resolved:
    """Rows in the caller's terms: loose files in the order given (repeats kept); a folder or a list in the
    shards' order, folder paths joined to the folder as the caller wrote it; failed files as error rows."""
    position = {p: i for i, p in enumerate(fs.paths.tolist())}
    if loose:
        asked = given if isinstance(given, list) else [given]
        by_given = {g: a for a, g in to_given.items()}
        keys = [by_given.get(g, os.path.abspath(Path(g).expanduser())) for g in asked]
        shown = asked
    else:
        keys = sorted(set(position) | set(errors))
        if source_path.is_dir():
            shown = [os.path.join(given, k) for k in keys]
        else:
            shown = keys
    rows = [position.get(k, -1) for k in keys]
    ok = np.asarray([r >= 0 for r in rows], bool)
    take = np.asarray([r for r in rows if r >= 0], np.int64)
    labels = [fs.labels[r] if r >= 0 else None for r in rows]
    if not loose:  # a failed file in a class folder still has its label (the folder name)
        labels = [lab if lab is not None or "/" not in k or not source_path.is_dir() else k.split("/", 1)[0]
                  for lab, k in zip(labels, keys)]
    reasons = [None if r >= 0 else errors.get(k, "not extracted (no vector and no recorded error)")
               for r, k in zip(rows, keys)]
    if not keys:
        raise DatasetError(f"{given}: no images found (supported: a class-folder tree, a flat folder, "
                           "a CSV/TSV/Parquet list with a 'path' column, or image files)")
    return Resolved(list(shown), labels, ok, fs.features[take], reasons, out)
