"""Streaming WebDataset shards with a deterministic, exactly resumable order."""

from .loader import TrainData, build_plan
from .plan import Item, StreamPlan
from .shardlist import Shard, resolve_shards

__all__ = ["TrainData", "build_plan", "Item", "StreamPlan", "Shard", "resolve_shards"]
