"""Building, indexing, verifying and inspecting WebDataset shards."""

from .writer import shard_filename, write_shard, write_shards

__all__ = ["shard_filename", "write_shard", "write_shards"]
