"""Counting DataComp-size shard lists once per job: 139,828 remote shards at 30 ms a request.

Part 1, the trainer's census (wds/census.take_census) at 64 ranks: the ranks are threads of this
process with thread-based broadcast and all-gather (what torch.distributed's object collectives do
between processes); the store is an fsspec file system registered here that answers from memory
after `--latency-ms` per request and counts every request (LIST pages of 1,000 objects, GETs,
HEADs). The shards have img2dataset's NNNNN_stats.json beside them and no manifest, so each count
is one GET. Measured: the first start (no cache), then a requeue (the run's cache, one listing).

Part 2, `clipscale data plan` (data/report.plan_report, in this process) on a local img2dataset
download of `--local-shards` shards with 3 % missing (data.missing_shards=skip) plus a remote
source of `--plan-remote-shards` on the same slow store, from a run folder with no cache.

    python benchmarks/count_at_scale.py [--shards 139828] [--ranks 64] [--latency-ms 30]
        [--concurrency 64] [--local-shards 41456] [--plan-remote-shards 10000] [--dir DIR]

Targets (issue 28): first start <= 300 s, requeue <= 30 s, data plan <= 60 s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import fsspec
from fsspec.spec import AbstractFileSystem

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from clipscale.wds.census import CACHE_NAME, SourceSpec, take_census  # noqa: E402

PROTOCOL = "slowbench"


class SlowStore(AbstractFileSystem):
    """An object store in memory: every request waits `latency` seconds and is counted by kind."""

    protocol = PROTOCOL
    latency = 0.03
    page = 1000
    folders: dict[str, dict[str, bytes | int]] = {}  # folder -> {name: content (bytes) or size}
    requests: Counter = Counter()
    lock = threading.Lock()

    def _request(self, kind: str, n: int = 1) -> None:
        with self.lock:
            self.requests[kind] += n
        time.sleep(self.latency * n)  # pages of a listing come one after another

    def _split(self, path: str) -> tuple[str, str]:
        path = self._strip_protocol(path).rstrip("/")
        folder, _, name = path.rpartition("/")
        return folder, name

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path).rstrip("/")
        if path not in self.folders:
            raise FileNotFoundError(path)
        entries = self.folders[path]
        self._request("LIST", max(1, -(-len(entries) // self.page)))
        out = [self._entry(path, n, c) for n, c in entries.items()]
        return out if detail else [e["name"] for e in out]

    @staticmethod
    def _entry(folder: str, name: str, content) -> dict:
        size = len(content) if isinstance(content, bytes) else content
        etag = f'"{hash((name, size)) & 0xFFFFFF:x}"'
        return {"name": f"{folder}/{name}", "size": size, "type": "file", "ETag": etag}

    def info(self, path, **kwargs):
        self._request("HEAD")
        folder, name = self._split(path)
        if name not in self.folders.get(folder, {}):
            raise FileNotFoundError(path)
        return self._entry(folder, name, self.folders[folder][name])

    def cat_file(self, path, start=None, end=None, **kwargs):
        self._request("GET")
        folder, name = self._split(path)
        content = self.folders.get(folder, {}).get(name)
        if content is None:
            raise FileNotFoundError(path)
        data = content if isinstance(content, bytes) else b"\0" * content
        return data[start:end]

    def invalidate_cache(self, path=None):
        pass


def make_remote_folder(folder: str, shards: int, per_shard: int = 10_000) -> str:
    """`shards` shards of img2dataset (NNNNNNNN.tar + NNNNNNNN_stats.json); returns the brace pattern."""
    entries: dict[str, bytes | int] = {}
    for i in range(shards):
        entries[f"{i:08d}.tar"] = 400 << 20
        entries[f"{i:08d}_stats.json"] = json.dumps({"successes": per_shard - i % 7, "count": per_shard}).encode()
    SlowStore.folders[folder] = entries
    return f"{PROTOCOL}://{folder}/{{00000000..{shards - 1:08d}}}.tar"


class ThreadGroup:
    """Object collectives between rank threads; records the bytes each would move."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list = [None] * world
        self.bytes = Counter()

    def broadcast(self, rank: int):
        def call(obj):
            if rank == 0:
                self.slots[0] = obj
                self.bytes["broadcast, to each rank"] = len(pickle.dumps(obj))
            self.barrier.wait()
            out = self.slots[0]
            self.barrier.wait()
            return out

        return call

    def gather(self, rank: int):
        def call(obj):
            self.slots[rank] = obj
            self.barrier.wait()
            out = list(self.slots)
            if rank == 0:
                self.bytes["all-gathered, to each rank"] = sum(len(pickle.dumps(o)) for o in out)
            self.barrier.wait()
            return out

        return call


def census_run(pattern: str, ranks: int, concurrency: int, cache: Path) -> tuple[float, Counter, Counter, int]:
    """One job's census over `ranks` rank threads: (seconds, requests by kind, bytes, samples)."""
    group = ThreadGroup(ranks)
    results: list = [None] * ranks
    errors: list = []
    SlowStore.requests.clear()

    def rank_main(rank: int):
        try:
            results[rank] = take_census(
                [SourceSpec("data.train_shards", pattern)],
                cache if rank == 0 else None,
                rank,
                ranks,
                group.gather(rank),
                group.broadcast(rank),
                concurrency=concurrency,
            )
        except BaseException as exn:  # noqa: BLE001 - reported below
            errors.append(exn)
            group.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,), name=f"rank{r}") for r in range(ranks)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    found = results[0][0]
    assert all(r[0].counts == found.counts for r in results), "ranks disagree"
    return seconds, Counter(SlowStore.requests), group.bytes, sum(found.counts.values())


def plan_run(root: Path, local_shards: int, remote_pattern: str) -> tuple[float, str]:
    from clipscale.config import load_config
    from clipscale.data.report import format_report, plan_report

    folder = root / "img2dataset"
    folder.mkdir(parents=True)
    missing = set(range(0, local_shards, 33))  # ~3 %: failed parquet parts
    for i in range(local_shards):
        if i not in missing:
            (folder / f"{i:05d}.tar").touch()
            (folder / f"{i:05d}_stats.json").write_text(json.dumps({"successes": 9_000 + i % 1000}))
    pattern = f"{folder}/{{00000..{local_shards - 1:05d}}}.tar"
    sources = (
        f"data.sources=[{{name: laion, shards: '{pattern}', weight: 0.7, missing_shards: skip}}, "
        f"{{name: datacomp, shards: '{remote_pattern}', weight: 0.3}}]"
    )
    cfg = load_config(None, [sources, f"run.dir={root / 'run'}", "train.steps=100000", "data.batch_size=256"])
    start = time.perf_counter()
    report = plan_report(cfg, world_size=64)
    seconds = time.perf_counter() - start
    return seconds, format_report(report, 10.0) + f"({len(missing)} local shards missing)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=139_828)
    ap.add_argument("--ranks", type=int, default=64)
    ap.add_argument("--latency-ms", type=float, default=30.0)
    ap.add_argument("--concurrency", type=int, default=64, help="counts in flight per rank (data.count_concurrency)")
    ap.add_argument("--local-shards", type=int, default=41_456)
    ap.add_argument("--plan-remote-shards", type=int, default=10_000)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    fsspec.register_implementation(PROTOCOL, SlowStore, clobber=True)
    SlowStore.latency = args.latency_ms / 1000
    root = Path(args.dir or tempfile.mkdtemp(prefix="count-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    cache = root / "job" / CACHE_NAME
    cache.unlink(missing_ok=True)

    pattern = make_remote_folder("datacomp/shards", args.shards)
    serial = args.shards * SlowStore.latency
    print(f"{args.shards:,} remote shards (img2dataset stats, no manifest), {args.latency_ms:g} ms a request, "
          f"{args.ranks} ranks x {args.concurrency} in flight; one rank alone: {serial / 60:.0f} min")  # fmt: skip
    failed = False
    for what, limit in (("first start", 300), ("requeue", 30)):
        seconds, requests, moved, samples = census_run(pattern, args.ranks, args.concurrency, cache)
        per_shard = requests["GET"] / args.shards
        print(f"{what}: {seconds:.1f} s (limit {limit}); requests: {requests['LIST']} LIST pages, "
              f"{requests['GET']:,} GET ({per_shard:.2f} per shard), {requests['HEAD']} HEAD; {samples:,} samples; "
              + ", ".join(f"{v / 1e6:.1f} MB {k}" for k, v in moved.items()))  # fmt: skip
        failed |= seconds > limit
    print(f"count cache: {cache.stat().st_size / 1e6:.1f} MB in the run folder")

    if args.local_shards:
        remote_pattern = make_remote_folder("datacomp/plan", args.plan_remote_shards)
        seconds, text = plan_run(root / "plan", args.local_shards, remote_pattern)
        print(f"\nclipscale data plan, {args.local_shards:,} local shards + {args.plan_remote_shards:,} remote, "
              f"no cache: {seconds:.1f} s (limit 60)")  # fmt: skip
        print(text)
        failed |= seconds > 60
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    if failed:
        print("FAILED: over a limit")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
