"""Shard URLs and their sample counts.

Exact resume and world-size-independent epochs need the number of samples in every shard
before reading it. Counts come, in order of preference, from an explicit manifest, a
`manifest.json` (clipscale), `sizes.json` (OpenCLIP), a wids index (`shardlist` entries), or
img2dataset's `NNNNN_stats.json` next to the shards; a shard with none of these is counted
by reading its tar headers once (with a warning: run `clipscale shards index`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from webdataset.shardlists import expand_urls

from ..errors import DataError
from ..shards.manifest import MANIFEST_NAME

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int


def local_path(url: str) -> Optional[str]:
    """The filesystem path of a local shard URL, or None for pipe:/remote URLs."""
    parsed = urlparse(url)
    if parsed.scheme == "":
        return url
    if parsed.scheme == "file":
        return parsed.path
    return None


def shard_name(url: str) -> str:
    """The file name a manifest uses for this URL (works for `pipe:... s3://b/x-000001.tar -`)."""
    path = local_path(url)
    if path is not None:
        return os.path.basename(path)
    found = re.findall(r"([^/\s'\"]+\.tar(?:\.gz)?)", url)
    return found[-1] if found else url


def expand(pattern: str) -> list[str]:
    """Brace-expand `pattern`; several patterns may be joined with '::'."""
    if not pattern or not pattern.strip():
        raise DataError("no training shards given: set data.train_shards (e.g. /data/cc3m-{000000..000331}.tar)")
    urls = [u for u in expand_urls(pattern) if u.strip()]
    if not urls:
        raise DataError(f"data.train_shards '{pattern}' expands to no shards")
    return urls


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def counts_from_index(data, where: str) -> dict[str, int]:
    """Sample counts by shard file name from any supported index format."""
    if isinstance(data, dict) and isinstance(data.get("shards"), list):  # clipscale manifest
        return {str(s["file"]): int(s["samples"]) for s in data["shards"]}
    if isinstance(data, dict) and isinstance(data.get("shardlist"), list):  # wids index
        return {shard_name(str(s["url"])): int(s["nsamples"]) for s in data["shardlist"]}
    if isinstance(data, dict) and data and all(isinstance(v, int) for v in data.values()):  # sizes.json
        return {os.path.basename(k): int(v) for k, v in data.items()}
    raise DataError(f"{where}: not a shard index (expected a clipscale manifest, sizes.json or wids index)")


def _counts_next_to(directory: Path, cache: dict) -> dict[str, int]:
    if directory in cache:
        return cache[directory]
    counts: dict[str, int] = {}
    for name in (MANIFEST_NAME, "sizes.json"):
        p = directory / name
        if p.is_file():
            counts = counts_from_index(_read_json(p), str(p))
            break
    cache[directory] = counts
    return counts


def _img2dataset_count(path: str) -> Optional[int]:
    stats = Path(path[: -len(".tar")] + "_stats.json") if path.endswith(".tar") else None
    if stats is not None and stats.is_file():
        data = _read_json(stats)
        if "successes" in data:
            return int(data["successes"])
    return None


def count_tar_samples(url: str) -> int:
    """Count samples (files grouped by key) in one tar by reading it; no decoding."""
    from .tar_reader import iter_raw_samples

    return sum(1 for _ in iter_raw_samples(url, on_error=lambda e: None))


def resolve_shards(pattern: str, manifest: Optional[str] = None, check_exists: bool = True) -> list[Shard]:
    """Expand `pattern` and attach a sample count to every shard; DataError for missing files."""
    urls = expand(pattern)
    explicit: dict[str, int] = {}
    if manifest:
        mp = Path(manifest)
        if not mp.is_file():
            raise DataError(f"manifest not found: {manifest}")
        explicit = counts_from_index(_read_json(mp), manifest)
    missing = [u for u in urls if (p := local_path(u)) is not None and check_exists and not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"shard not found: {missing[0]}{more}")
    cache: dict = {}
    shards = []
    scanned = 0
    for url in urls:
        name = shard_name(url)
        count = explicit.get(name)
        path = local_path(url)
        if count is None and path is not None:
            count = _counts_next_to(Path(path).parent, cache).get(name)
            if count is None:
                count = _img2dataset_count(path)
        if count is None:
            count = count_tar_samples(url)
            scanned += 1
        shards.append(Shard(url=url, samples=count))
    if scanned:
        log.warning("%d shard(s) had no manifest entry and were counted by reading them; "
                    "run `clipscale shards index DIR` to write a manifest.json", scanned)
    if sum(s.samples for s in shards) == 0:
        raise DataError(f"data.train_shards '{pattern}' holds no samples")
    return shards
