"""Shard URLs and their sample counts.

Patterns are brace-expanded (`/data/x-{000000..000099}.tar`), several joined with `::`. Counts
come, in order of preference, from an explicit index (`data.manifest`), an index next to the
shards (`manifest.json`, OpenCLIP's `sizes.json`), or img2dataset's `NNNNN_stats.json`; a
shard with none of these is counted by reading its tar headers once (with a warning: run
`clipscale shards index`). Local shards are checked to exist once, by listing each folder (a
LAION-sized set has 231,000 files: one stat each would take minutes on a network file system).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import braceexpand

from ..errors import DataError
from .manifest import INDEX_NAMES, ShardRecord, index_next_to, parse_index, read_index
from .remote import expand_remote_glob, fsspec_reads, has_glob, is_remote, missing_remote, read_remote_json
from .urls import local_path, shard_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int


def expand(pattern: str, what: str = "data.train_shards") -> list[str]:
    """Brace-expand `pattern`; several patterns may be joined with '::'. (Unlike webdataset's
    expand_urls, `${VAR}` is not replaced from the environment: the shell does that already.)"""
    if not pattern or not pattern.strip():
        raise DataError(f"no shards given: set {what} (e.g. /data/cc3m-{{000000..000331}}.tar)")
    urls = [u for part in pattern.split("::") for u in braceexpand.braceexpand(part.strip()) if u.strip()]
    if any(is_remote(u) and has_glob(u) for u in urls):  # s3://bucket/prefix/*.tar: one listing
        urls = [g for u in urls for g in (expand_remote_glob(u) if is_remote(u) and has_glob(u) else [u])]
    if not urls:
        raise DataError(f"{what} '{pattern}' expands to no shards")
    return urls


def missing_local_shards(urls: list[str]) -> list[str]:
    """The local URLs whose file does not exist. Each folder is listed once (one stat per file
    would take minutes for a LAION-sized set on a network file system); a name the listing does
    not show (an unlistable folder, a case-folding file system) is checked on its own."""
    by_folder: dict[str, list[tuple[str, str, str]]] = {}
    for url in urls:
        path = local_path(url)
        if path is not None:
            folder, name = os.path.split(path)
            by_folder.setdefault(folder or ".", []).append((url, name, path))
    missing = []
    for folder, entries in by_folder.items():
        try:
            listed = set(os.listdir(folder))
        except OSError:
            listed = set()
        missing.extend(url for url, name, path in entries if name not in listed and not os.path.isfile(path))
    return missing


def require_shards_exist(urls: list[str], what: str = "shard") -> None:
    """DataError naming the first missing local or remote shard (and how many more are missing)."""
    missing = missing_local_shards(urls)
    remote = [u for u in urls if is_remote(u) and fsspec_reads(u)]
    if remote:
        missing += missing_remote(remote)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{what} not found: {missing[0]}{more}")


def _img2dataset_count(path: str) -> int | None:
    stats = Path(path[: -len(".tar")] + "_stats.json") if path.endswith(".tar") else None
    if stats is not None and stats.is_file():
        try:
            data = json.loads(stats.read_text())
        except (OSError, ValueError) as exn:
            raise DataError(f"cannot read {stats}: {exn}") from None
        if isinstance(data, dict) and "successes" in data:
            return int(data["successes"])
    return None


def count_tar_samples(url: str) -> int:
    """Count samples (files grouped by key) in one tar by reading it; no decoding. DataError when
    it cannot be read: a shard that cannot be counted must not silently drop out of training."""
    from .tar import iter_raw_samples

    def fail(exn: Exception):
        raise DataError(f"cannot count the samples of shard {url} (no index lists it): {type(exn).__name__}: {exn}")

    return sum(1 for _ in iter_raw_samples(url, on_error=fail))


class _Counts:
    """Sample counts by URL: the explicit index, else indexes next to the shards (read once per
    folder), else img2dataset stats, else `fallback` (counting by reading)."""

    def __init__(self, manifest: str | None, fallback: Callable[[str], int]):
        self.explicit: dict[str, ShardRecord] = {}
        if manifest and is_remote(manifest):
            data = read_remote_json(manifest)
            if data is None:
                raise DataError(f"manifest not found: {manifest}")
            self.explicit = parse_index(data, manifest)
        elif manifest:
            self.explicit = read_index(manifest)
        self.folders: dict[str, dict[str, ShardRecord]] = {}
        self.fallback = fallback
        self.counted = 0

    def __call__(self, url: str) -> int:
        path = local_path(url)
        name = os.path.basename(path) if path is not None else shard_name(url)  # (shard_name, parsing once)
        if name in self.explicit:
            return self.explicit[name].samples
        if path is not None:
            folder = os.path.dirname(path) or "."
            if folder not in self.folders:
                self.folders[folder] = index_next_to(Path(folder)) or {}
            if name in self.folders[folder]:
                return self.folders[folder][name].samples
            found = _img2dataset_count(path)
            if found is not None:
                return found
        elif is_remote(url) and fsspec_reads(url):
            folder = url.rsplit("/", 1)[0]
            if folder not in self.folders:
                self.folders[folder] = remote_index_next_to(folder)
            if name in self.folders[folder]:
                return self.folders[folder][name].samples
            stats = read_remote_json(url[: -len(".tar")] + "_stats.json") if url.endswith(".tar") else None
            if isinstance(stats, dict) and "successes" in stats:  # img2dataset: one small request, not the shard
                return int(stats["successes"])
        self.counted += 1
        return self.fallback(url)


def remote_index_next_to(folder: str) -> dict[str, ShardRecord]:
    """The records of the first index file next to remote shards (read once per folder), or {}."""
    for name in INDEX_NAMES:
        data = read_remote_json(f"{folder}/{name}")
        if data is not None:
            return parse_index(data, f"{folder}/{name}")
    return {}


def resolve_shards(
    pattern: str, manifest: str | None = None, check_exists: bool = True, what: str = "data.train_shards"
) -> list[Shard]:
    """Expand `pattern` and attach a sample count to every shard; DataError for missing files.

    Shards that hold no samples are dropped with a warning (a stream cannot read from them)."""
    urls = expand(pattern, what)
    if check_exists:
        require_shards_exist(urls)
    counts = _Counts(manifest, count_tar_samples)
    shards = [Shard(url, counts(url)) for url in urls]
    if counts.counted:
        log.warning(
            "%d shard(s) had no manifest entry and were counted by reading them; "
            "run `clipscale shards index DIR` to write a manifest.json",
            counts.counted,
        )
    empty = [s for s in shards if s.samples <= 0]
    if empty:
        log.warning("%d shard(s) of %s hold no samples and are left out, e.g. %s", len(empty), what, empty[0].url)
        shards = [s for s in shards if s.samples > 0]
    if not shards:
        raise DataError(f"{what} '{pattern}' holds no samples")
    return shards
