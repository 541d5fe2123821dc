"""The data sources of a run: `data.sources` (or the one-source shorthand `data.train_shards`),
each resolved to its shards and planned over the run's streams, with its mixing weight."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DataConfig, SourceConfig
from ..errors import DataError
from ..wds.shardlist import resolve_shards
from .plan import StreamPlan

DEFAULT_NAME = "train"  # the name of the data.train_shards source


@dataclass
class Source:
    name: str
    plan: StreamPlan
    weight: float  # share of every batch (unnormalised)
    repeat: float | None = None  # samples per mixture epoch / source size, in repeat mode

    @property
    def samples(self) -> int:
        return self.plan.total_samples


def source_configs(d: DataConfig) -> list[tuple[str, SourceConfig]]:
    """(where in the config, source) for every source; data.train_shards is one source named 'train'."""
    if d.sources:
        return [(f"data.sources.{i}.shards", src) for i, src in enumerate(d.sources)]
    return [("data.train_shards", SourceConfig(DEFAULT_NAME, d.train_shards, manifest=d.manifest))]


def plan_for(d: DataConfig, seed: int, name: str, shards, num_streams: int) -> StreamPlan:
    try:
        return StreamPlan(shards, seed, num_streams, d.shuffle, d.shuffle_block_shards, d.shuffle_buffer, name)
    except ValueError as exn:
        raise DataError(f"data source {name!r}: {exn}") from None


def build_sources(d: DataConfig, seed: int, num_streams: int) -> list[Source]:
    """Every source resolved (shards, counts) and planned. Weights: `weight` as given; with
    `repeat` (or neither), repeat x the source's samples: each sample `repeat` times (once) per
    mixture epoch."""
    out = []
    for where, src in source_configs(d):
        plan = plan_for(d, seed, src.name, resolve_shards(src.shards, src.manifest, what=where), num_streams)
        if src.weight is not None:
            out.append(Source(src.name, plan, src.weight))
        else:
            repeat = 1.0 if src.repeat is None else src.repeat
            out.append(Source(src.name, plan, repeat * plan.total_samples, repeat))
    return out


def epoch_samples(sources: list[Source]) -> int:
    """Samples of one mixture epoch: every sample once (weights), or `repeat` times (repeats)."""
    return int(round(sum(s.samples * (s.repeat if s.repeat is not None else 1.0) for s in sources)))
