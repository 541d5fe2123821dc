"""Building, indexing, verifying and inspecting WebDataset shards."""

from .manifest import ShardRecord, read_manifest, write_manifest
from .writer import shard_filename, write_shard, write_shards

__all__ = ["ShardRecord", "read_manifest", "write_manifest", "shard_filename", "write_shard", "write_shards"]
