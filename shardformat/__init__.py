"""The Parquet feature-shard format: the one contract between stage 1 and stage 2.

Stage 1 writes shards with :func:`write_shard`; stage 2 (and anyone else) reads them with
:func:`read_features`. Both sides import only this package, never each other.
The format is documented in ``docs/shard-format.md``.
"""

from shardformat.schema import (
    FORMAT_VERSION,
    METADATA_KEY,
    SHARD_PREFIX,
    ERRORS_FILE,
    ShardFormatError,
    IncompatibleShardsError,
    ShardMetadata,
    shard_schema,
    compatibility_key,
)
from shardformat.io import (
    FeatureSet,
    atomic_write_table,
    list_shards,
    read_features,
    read_index,
    read_metadata,
    resolve,
    write_shard,
)
from shardformat.errors import ERRORS_SCHEMA, read_errors, write_errors
from shardformat.layout import shard_name
from shardformat.files import atomic_write_bytes, atomic_write_json, atomic_write_text, atomic_write_via_path, read_json

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "SHARD_PREFIX",
    "ERRORS_FILE",
    "ShardFormatError",
    "IncompatibleShardsError",
    "ShardMetadata",
    "shard_schema",
    "compatibility_key",
    "FeatureSet",
    "atomic_write_table",
    "list_shards",
    "read_features",
    "read_index",
    "read_metadata",
    "resolve",
    "write_shard",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_write_via_path",
    "read_json",
    "ERRORS_SCHEMA",
    "read_errors",
    "write_errors",
    "shard_name",
]
