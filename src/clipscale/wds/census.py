"""Every shard's sample count, found once per job and shared by all ranks.

Exact resume needs each shard's count before a byte of it is read. Counts come, in order, from an
index (`data.manifest`, or `manifest.json` / `sizes.json` beside the shards: `clipscale shards
index`), from the run's count cache, from img2dataset's `NNNNN_stats.json`, or from reading the
shard. The last two cost a request (or a whole read) per shard, so they are done once per job:
the main rank lists the folders (one LIST per 1,000 objects) and says what is left to count; every
rank counts its slice of it (`concurrency` requests in flight per rank); the counts are gathered
and the main rank writes them to RUN_DIR/shard_counts.json, keyed by each object's size and
version (ETag, generation, local mtime) as the listing showed them. A requeue or resume lists
again and counts only what is new or changed: 139,828 DataComp shards at 30 ms a request take
one listing, not an hour per rank (benchmarks/count_at_scale.py).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import DataError
from ..fsutil import atomic_write_bytes
from .listing import ShardListing, stats_name
from .manifest import INDEX_NAMES, ShardRecord, parse_index, read_index
from .remote import filesystem, is_remote, with_retries
from .urls import shard_name

log = logging.getLogger(__name__)

CACHE_NAME = "shard_counts.json"
CACHE_FORMAT = "clipscale-shard-counts/1"
SOURCES = ("manifest", "cache", "stats", "reading")  # where a count came from, in order of preference


@dataclass
class SourceCount:
    """One source's shards as found: present URLs in order, missing ones, counts and their origin."""

    what: str
    urls: list[str]
    missing: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    how: dict[str, str] = field(default_factory=dict)  # url -> one of SOURCES
    keys: dict[str, list] = field(default_factory=dict)  # url -> [size, version] for the cache
    seconds: float = 0.0  # how long counting took (this census, all sources)

    def by_origin(self) -> dict[str, int]:
        out = dict.fromkeys(SOURCES, 0)
        for url in self.urls:
            if url in self.how:
                out[self.how[url]] += 1
        out["left"] = sum(1 for u in self.urls if u not in self.counts)
        return out

    @property
    def estimated(self) -> int:
        """Shards with a count but no origin: the mean of the others (`clipscale data plan` only)."""
        return sum(1 for u in self.urls if u in self.counts and u not in self.how)


@dataclass
class Task:
    url: str
    how: str  # "stats" or "reading"


def read_json(url: str):
    """A small JSON file, local or remote, or None when it does not exist."""
    try:
        if is_remote(url):
            fs, path = filesystem(url)
            data = with_retries(f"reading {url}", lambda: fs.cat_file(path))
        else:
            data = Path(url).read_bytes()
    except (FileNotFoundError, PermissionError):  # S3 answers 403 for a missing key without ListBucket
        return None
    except OSError as exn:
        raise DataError(f"cannot read {url}: {exn}") from None
    try:
        return json.loads(data)
    except ValueError as exn:
        raise DataError(f"cannot read {url}: {exn}") from None


def count_tar_samples(url: str) -> int:
    """Count samples (files grouped by key) in one tar by reading it; no decoding. DataError when
    it cannot be read: a shard that cannot be counted must not silently drop out of training."""
    from .tar import iter_raw_samples

    def fail(exn: Exception):
        raise DataError(f"cannot count the samples of shard {url} (no index lists it): {type(exn).__name__}: {exn}")

    return sum(1 for _ in iter_raw_samples(url, on_error=fail))


def count_one(task: Task) -> tuple[int, str]:
    """(samples, where the count came from): img2dataset's stats where they are (or may be: a folder
    that was not listed), else reading the shard."""
    if task.how == "stats":
        stats = read_json(stats_name(task.url))
        if isinstance(stats, dict) and "successes" in stats:
            return int(stats["successes"]), "stats"
    return count_tar_samples(task.url), "reading"


class CountCache:
    """RUN_DIR/shard_counts.json: url -> [size, version, samples, how]; valid while size and version hold."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, list] = {}
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
                if data.get("format") == CACHE_FORMAT:
                    self.entries = dict(data["shards"])
            except (OSError, ValueError, KeyError, AttributeError) as exn:
                log.warning("ignoring the shard count cache %s: %s", path, exn)

    def get(self, url: str, key: list | None) -> int | None:
        entry = self.entries.get(url)
        if entry is None or key is None or key[0] is None and key[1] is None:
            return None
        return int(entry[2]) if entry[:2] == key else None

    def write(self, found: list[SourceCount]) -> None:
        if self.path is None:
            return
        fresh = {
            url: [*s.keys[url], s.counts[url], s.how[url]]
            for s in found
            for url in s.urls
            if s.how.get(url) in ("cache", "stats", "reading") and url in s.keys
        }
        if fresh == self.entries:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, json.dumps({"format": CACHE_FORMAT, "shards": fresh}).encode())
        self.entries = fresh


class IndexCounts:
    """Counts from indexes: the explicit one, else one beside each folder (read once per folder, and
    only where the listing shows it)."""

    def __init__(self, manifest: str | None, listing: ShardListing):
        self.listing = listing
        self.explicit: dict[str, ShardRecord] = {}
        if manifest and is_remote(manifest):
            data = read_json(manifest)
            if data is None:
                raise DataError(f"manifest not found: {manifest}")
            self.explicit = parse_index(data, manifest)
        elif manifest:
            self.explicit = read_index(manifest)
        self.beside: dict[str, dict[str, ShardRecord]] = {}

    def __call__(self, url: str) -> int | None:
        name = shard_name(url)
        if name in self.explicit:
            return self.explicit[name].samples
        folder, _, _ = self.listing.folder_of(url)
        if folder is None:
            return None
        if folder.url not in self.beside:
            self.beside[folder.url] = self._index_in(folder)
        record = self.beside[folder.url].get(name)
        return record.samples if record is not None else None

    @staticmethod
    def _index_in(folder) -> dict[str, ShardRecord]:
        for index in INDEX_NAMES:
            listed = folder.has(index)
            if listed is False:
                continue
            if folder.local and not listed and not os.path.isfile(os.path.join(folder.url, index)):
                continue
            data = read_json(f"{folder.url}/{index}" if not folder.local else os.path.join(folder.url, index))
            if data is not None:
                return parse_index(data, f"{folder.url}/{index}")
        return {}


def survey(
    urls: list[str], what: str, manifest: str | None, cache: CountCache, missing_policy: str = "error"
) -> tuple[SourceCount, list[Task]]:
    """Main rank: list the folders, apply the missing-shard policy, take what the indexes and the
    cache know; return the source and the counts still to make."""
    listing = ShardListing(urls)
    missing = listing.missing()
    if missing and missing_policy != "skip":
        raise DataError(missing_message(what, missing, len(urls)))
    gone = set(missing)
    found = SourceCount(what, [u for u in urls if u not in gone], missing)
    index = IndexCounts(manifest, listing)
    tasks = []
    if not index.explicit:
        listing.prefetch_local_infos(found.urls)
    for url in found.urls:
        samples = index(url)
        if samples is not None:
            found.counts[url], found.how[url] = samples, "manifest"
            continue
        info = listing.info(url)
        key = info.key() if info is not None else [None, None]
        found.keys[url] = key
        cached = cache.get(url, key)
        if cached is not None:
            found.counts[url], found.how[url] = cached, "cache"
            continue
        name = stats_name(shard_name(url))
        beside = listing.beside(url, name) if name else False
        tasks.append(Task(url, "reading" if beside is False else "stats"))  # (None: not listed, so try)
    return found, tasks


def missing_message(what: str, missing: list[str], total: int) -> str:
    first = ", ".join(missing[:3])
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    key = what[: -len(".shards")] + ".missing_shards" if what.endswith(".shards") else "data.missing_shards"
    return f"{what}: {len(missing)} of {total} shards not found ({first}{more}); set {key}=skip to train on the rest"


class Progress:
    """Counting progress on the main rank: a tqdm bar on a terminal, else a log line every 15 s;
    `beat` (the hang watchdog) is told of every count."""

    def __init__(self, total: int, show: bool, beat: Callable[[], None] | None, what: str = "counting shards"):
        self.total, self.done, self.start = total, 0, time.monotonic()
        self.beat, self.what, self.last_line = beat, what, self.start
        self.bar = None
        if show and total and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit="shard", mininterval=1.0)
        self.show = show

    def step(self) -> None:
        self.done += 1
        if self.beat is not None:
            self.beat()
        if self.bar is not None:
            self.bar.update(1)
        elif self.show and time.monotonic() - self.last_line > 15:
            self.last_line = time.monotonic()
            rate = self.done / max(self.last_line - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            log.info(
                "%s: %d of %d on this rank (%.1f/s, about %.0f s left)", self.what, self.done, self.total, rate, eta
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def count_slice(
    tasks: list[Task], concurrency: int, progress: Progress, deadline: float | None = None
) -> tuple[dict[str, int], str | None]:
    """Count `tasks` with `concurrency` requests in flight; ({url: (samples, how)}, first error). Past `deadline`
    (time.monotonic) no new count starts: what is left stays uncounted."""
    counts: dict[str, tuple[int, str]] = {}
    error = None
    if not tasks:
        return counts, None
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(tasks))), thread_name_prefix="count") as pool:
        pending = iter(tasks)
        running = {}
        for task in pending:
            running[pool.submit(count_one, task)] = task
            if len(running) >= concurrency:
                break
        while running:
            done = next(as_completed(running))
            task = running.pop(done)
            try:
                counts[task.url] = done.result()
            except DataError as exn:
                error = error or str(exn)
            except Exception as exn:  # noqa: BLE001 - a store's own error types: one line, on every rank
                error = error or f"cannot count the samples of shard {task.url}: {type(exn).__name__}: {exn}"
            progress.step()
            if error is None and (deadline is None or time.monotonic() < deadline):
                task = next(pending, None)
                if task is not None:
                    running[pool.submit(count_one, task)] = task
    return counts, error


@dataclass(frozen=True)
class SourceSpec:
    """A source as configured: where in the config, its shard list, index and missing-shard policy."""

    what: str
    pattern: str
    manifest: str | None = None
    missing: str = "error"


def _survey_all(specs: list[SourceSpec], cache: CountCache):
    from .expand import expand

    try:
        return "ok", [survey(expand(s.pattern, s.what), s.what, s.manifest, cache, s.missing) for s in specs]
    except DataError as exn:
        return "error", str(exn)
    except Exception as exn:  # noqa: BLE001 - e.g. a listing that kept failing: every rank must hear of it
        return "error", f"cannot list the shards: {type(exn).__name__}: {exn}"


def take_census(
    specs: list[SourceSpec],
    cache_path: Path | None = None,
    rank: int = 0,
    world: int = 1,
    gather: Callable | None = None,
    broadcast: Callable | None = None,
    beat: Callable[[], None] | None = None,
    concurrency: int = 64,
    budget_s: float | None = None,
) -> list[SourceCount]:
    """Collective over `world` ranks (`gather`/`broadcast`: the job's all_gather_object and
    broadcast_object): every source's shards and counts, the same on every rank. With `budget_s`,
    counting stops starting new counts after that long (`clipscale data plan`: the rest is estimated)."""
    cache = CountCache(cache_path) if rank == 0 else CountCache(None)
    plan = _survey_all(specs, cache) if rank == 0 else None
    if world > 1:
        plan = broadcast(plan)
    if plan[0] == "error":
        raise DataError(plan[1])
    surveyed = plan[1]
    tasks = [t for _, ts in surveyed for t in ts]
    mine = tasks[rank::world]
    progress = Progress(len(mine), show=rank == 0 and len(tasks) > 0, beat=beat)
    if tasks and rank == 0:
        log.info("counting the samples of %d shard(s) no index or cache knows, on %d rank(s)", len(tasks), world)
    started = time.monotonic()
    deadline = started + budget_s if budget_s is not None else None
    try:
        counts, error = count_slice(mine, concurrency, progress, deadline)
    finally:
        progress.close()
    results = gather((counts, error)) if world > 1 else [(counts, error)]
    errors = [e for _, e in results if e]
    if errors:
        raise DataError(errors[0])
    merged: dict[str, tuple[int, str]] = {}
    for part, _ in results:
        merged.update(part)
    found = []
    seconds = time.monotonic() - started
    for source, todo in surveyed:
        source.seconds = seconds
        for task in todo:
            if task.url in merged:
                source.counts[task.url], source.how[task.url] = merged[task.url]
        found.append(source)
    if rank == 0:
        try:
            cache.write(found)
        except OSError as exn:  # the counts are known: a cache that cannot be written costs only time
            log.warning("could not write the shard count cache %s: %s", cache.path, exn)
    return found
