"""Column layout and schema metadata of a feature shard."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import pyarrow as pa

FORMAT_VERSION = 1
METADATA_KEY = b"hybrid_transfer"
SHARD_PREFIX = "part-"
# Bookkeeping lives beside the shard folder, in "<OUT>.meta/", never inside it: polars reads a folder
# recursively and refuses any file that is not a shard, and duckdb's "OUT/*.parquet" would count its rows.
META_SUFFIX = ".meta"
ERRORS_FILE = "errors.parquet"  # in the meta folder
LEGACY_ERRORS_FILE = "_errors.parquet"  # inside OUT itself, as written before the meta folder; still read

FEATURE_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


class ShardFormatError(ValueError):
    """A file is not a feature shard of this project, or is damaged."""


class IncompatibleShardsError(ShardFormatError):
    """Shards (or a model and shards) come from different backbones, weights or preprocessing."""


@dataclasses.dataclass(frozen=True)
class ShardMetadata:
    """What produced the vectors in a shard. Stored as JSON under ``METADATA_KEY``.

    ``compatibility_key()`` covers the fields that change the meaning of a vector; two shards
    (or a trained model and a shard) may be used together only when those keys are equal.
    """

    backbone: str
    weights_id: str
    onnx_sha256: str
    preprocessing: dict[str, Any]
    feature_dim: int
    feature_dtype: str = "float32"
    precision: str = "fp32"
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    #: where a fine-tuned backbone came from (empty for pretrained ones): ``kind``, ``base_backbone``,
    #: ``base_weights_id``, ``run``, ``split_sha256``, ``weights_sha256`` (docs/shard-format.md). Its weights_id
    #: differs from the pretrained one, so such vectors are never mixed with pretrained vectors.
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "ShardMetadata":
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ShardFormatError(f"shard metadata is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ShardFormatError("shard metadata is not a JSON object")
        version = raw.get("format_version")
        if isinstance(version, bool) or version != FORMAT_VERSION:
            raise ShardFormatError(
                f"shard format version {version!r} is not supported (this code reads version {FORMAT_VERSION})"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        missing = {"backbone", "weights_id", "onnx_sha256", "preprocessing", "feature_dim"} - raw.keys()
        if missing:
            raise ShardFormatError(f"shard metadata lacks {sorted(missing)}")
        for key, kind in (("backbone", str), ("weights_id", str), ("onnx_sha256", str), ("feature_dtype", str),
                          ("precision", str), ("preprocessing", dict), ("versions", dict),
                          ("provenance", dict)):
            if key in raw and not isinstance(raw[key], kind):  # a foreign file; would break messages and keys later
                raise ShardFormatError(f"shard metadata {key!r} should be a {kind.__name__}, found {raw[key]!r}")
        meta = cls(**{k: v for k, v in raw.items() if k in known})
        if meta.feature_dtype not in FEATURE_DTYPES:
            raise ShardFormatError(f"unknown feature dtype {meta.feature_dtype!r}")
        if isinstance(meta.feature_dim, bool) or not isinstance(meta.feature_dim, int) or meta.feature_dim <= 0:
            raise ShardFormatError(f"bad feature_dim {meta.feature_dim!r}")
        return meta

    def compatibility_key(self) -> str:
        return compatibility_key(self)

    def describe(self) -> str:
        text = f"backbone={self.backbone} weights={self.weights_id[:24]} dim={self.feature_dim}"
        if self.provenance.get("kind") == "finetuned":
            text += f" (fine-tuned on run {self.provenance.get('run')}, input {self.preprocessing.get('input_size')} px)"
        return text


def compatibility_key(meta: ShardMetadata) -> str:
    """Hash of what makes vectors comparable: backbone, weights, preprocessing and dimension.

    Precision (fp32/fp16 inference) and package versions are recorded but left out: they move
    features by rounding noise, not meaning.
    """
    payload = json.dumps(
        {
            "backbone": meta.backbone,
            "weights_id": meta.weights_id,
            "preprocessing": meta.preprocessing,
            "feature_dim": meta.feature_dim,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def shard_schema(meta: ShardMetadata) -> pa.Schema:
    """The Arrow schema of a shard, with ``meta`` attached as schema metadata."""
    return pa.schema(
        [
            pa.field("path", pa.string(), nullable=False),
            pa.field("label", pa.string(), nullable=True),
            pa.field("content_id", pa.string(), nullable=False),
            pa.field("file_size", pa.int64(), nullable=False),
            pa.field("mtime_ns", pa.int64(), nullable=False),
            pa.field("group", pa.string(), nullable=True),
            pa.field(
                "feature",
                pa.list_(pa.field("item", FEATURE_DTYPES[meta.feature_dtype], nullable=False), meta.feature_dim),
                nullable=False,
            ),
        ],
        metadata={METADATA_KEY: meta.to_json().encode()},
    )


INDEX_COLUMNS = ["path", "label", "content_id", "file_size", "mtime_ns", "group"]
#: Columns added after version 1 was first released: optional on read (a shard without one reads as all null),
#: always written. Adding a nullable column keeps every older shard readable, so the format version stays 1.
OPTIONAL_COLUMNS = {"group": pa.string()}
