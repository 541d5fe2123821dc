"""Shard URLs and their sample counts: `resolve_shards` for one shard list in one process (the
trainer resolves its sources together, once per job: data/sources.py, wds/census.py).

Expanding a shard list (`expand`): wds/expand.py. What exists beside the shards: wds/listing.py.
Where counts come from (indexes, the run's cache, img2dataset stats, reading): wds/census.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .census import SourceCount, SourceSpec, count_tar_samples, take_census
from .expand import expand
from .listing import ShardListing

log = logging.getLogger(__name__)

__all__ = ["Shard", "expand", "count_tar_samples", "resolve_shards", "require_shards_exist", "shards_of"]


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int


def missing_local_shards(urls: list[str]) -> list[str]:
    """The local URLs whose file does not exist (each folder listed once)."""
    return ShardListing([u for u in urls if ShardListing.is_local(u)]).missing()


def require_shards_exist(urls: list[str], what: str = "shard") -> None:
    """DataError naming the first missing local or remote shard (and how many more are missing)."""
    missing = ShardListing(urls).missing()
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{what} not found: {missing[0]}{more}")


def shards_of(found: SourceCount, estimate: bool = False) -> list[Shard]:
    """The counted shards of a source; shards that hold no samples are left out with a warning (a
    stream cannot read from them). `estimate` (`clipscale data plan` past its counting budget): a
    shard not counted yet stands at the mean of those counted."""
    if estimate:
        known = [found.counts[u] for u in found.urls if u in found.counts]
        if not known:
            raise DataError(f"{found.what}: no shard was counted in time; give the count more time")
        mean = max(1, round(sum(known) / len(known)))
        found.counts.update({u: mean for u in found.urls if u not in found.counts})
    reading = sum(1 for u in found.urls if found.how.get(u) == "reading")
    if reading:
        log.warning(
            "%s: %d shard(s) had no index entry and were counted by reading them (cached for this run); "
            "run `clipscale shards index DIR` to write a manifest.json",
            found.what,
            reading,
        )
    if found.missing:
        log.warning(
            "%s: %d missing shard(s) skipped (missing_shards: skip), e.g. %s",
            found.what,
            len(found.missing),
            found.missing[0],
        )
    shards = [Shard(u, found.counts[u]) for u in found.urls]
    empty = [s for s in shards if s.samples <= 0]
    if empty:
        log.warning("%d shard(s) of %s hold no samples and are left out, e.g. %s", len(empty), found.what, empty[0].url)
        shards = [s for s in shards if s.samples > 0]
    if not shards:
        raise DataError(f"{found.what} holds no samples")
    return shards


def resolve_shards(
    pattern: str,
    manifest: str | None = None,
    what: str = "data.train_shards",
    missing: str = "error",
    cache_path: Path | None = None,
) -> list[Shard]:
    """Expand `pattern` and attach a sample count to every shard (in this process alone); DataError
    for missing shards unless `missing` is "skip"."""
    return shards_of(take_census([SourceSpec(what, pattern, manifest, missing)], cache_path)[0])
