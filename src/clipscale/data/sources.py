"""The data sources of a run: `data.sources` (or the one-source shorthand `data.train_shards`),
each resolved to its shards and planned over the run's streams, with its mixing weight."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DataConfig, SourceConfig
from ..errors import DataError
from ..wds.census import SourceCount, SourceSpec, take_census
from ..wds.shardlist import shards_of
from .plan import StreamPlan

DEFAULT_NAME = "train"  # the name of the data.train_shards source


@dataclass
class Source:
    name: str
    plan: StreamPlan
    weight: float  # share of every batch (unnormalised)
    repeat: float | None = None  # samples per mixture epoch / source size, in repeat mode
    found: SourceCount | None = None  # shards found and missing, and where their counts came from

    @property
    def samples(self) -> int:
        return self.plan.total_samples

    @property
    def missing(self) -> int:
        return len(self.found.missing) if self.found is not None else 0


def source_configs(d: DataConfig) -> list[tuple[str, SourceConfig]]:
    """(where in the config, source) for every source; data.train_shards is one source named 'train'."""
    if d.sources:
        return [(f"data.sources.{i}.shards", src) for i, src in enumerate(d.sources)]
    one = SourceConfig(DEFAULT_NAME, d.train_shards, manifest=d.manifest, missing_shards=d.missing_shards)
    return [("data.train_shards", one)]


def plan_for(d: DataConfig, seed: int, name: str, shards, num_streams: int) -> StreamPlan:
    try:
        return StreamPlan(shards, seed, num_streams, d.shuffle, d.shuffle_block_shards, d.shuffle_buffer, name)
    except ValueError as exn:
        raise DataError(f"data source {name!r}: {exn}") from None


def build_sources(d: DataConfig, seed: int, num_streams: int, estimate: bool = False, **census) -> list[Source]:
    """Every source resolved (shards, counts: once per job, wds/census.py; `census`: its rank, world,
    gather, broadcast, cache and watchdog hooks) and planned. Weights: `weight` as given; with
    `repeat` (or neither), repeat x the source's samples: each sample `repeat` times (once) per
    mixture epoch. `estimate`: shards the census left uncounted (its budget_s) stand at the mean."""
    configs = source_configs(d)
    specs = [SourceSpec(where, src.shards, src.manifest, src.missing_shards) for where, src in configs]
    counted = take_census(specs, concurrency=d.count_concurrency, **census)
    out = []
    for (_, src), found in zip(configs, counted):
        plan = plan_for(d, seed, src.name, shards_of(found, estimate), num_streams)
        if src.weight is not None:
            out.append(Source(src.name, plan, src.weight, found=found))
        else:
            repeat = 1.0 if src.repeat is None else src.repeat
            out.append(Source(src.name, plan, repeat * plan.total_samples, repeat, found=found))
    return out


def epoch_samples(sources: list[Source]) -> int:
    """Samples of one mixture epoch: every sample once (weights), or `repeat` times (repeats)."""
    return int(round(sum(s.samples * (s.repeat if s.repeat is not None else 1.0) for s in sources)))
