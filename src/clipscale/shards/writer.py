"""Writing WebDataset shards: one tar per shard, written under a temporary name, then renamed.

Tars are reproducible (fixed mtime, sorted member order via webdataset's TarWriter), so the
same samples always give byte-identical shards.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

from webdataset import TarWriter

from ..checkpoint import fsync_dir
from .manifest import ShardRecord, sha256_file, write_manifest

MTIME = 0.0  # reproducible tars


def shard_filename(name: str, index: int) -> str:
    return f"{name}-{index:06d}.tar"


def write_shard(path: Path, samples: Iterable[dict]) -> ShardRecord:
    """Write `samples` ({"__key__": str, ext: bytes|str, ...}) to `path` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    with open(tmp, "wb") as f:
        with TarWriter(f, encoder=False, mtime=MTIME, user="clipscale", group="clipscale") as tw:
            for sample in samples:
                tw.write({k: (v.encode("utf-8") if isinstance(v, str) and k != "__key__" else v)
                          for k, v in sample.items()})
                count += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return ShardRecord(file=path.name, samples=count, bytes=path.stat().st_size, sha256=sha256_file(path))


def _chunks(samples: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for s in samples:
        chunk.append(s)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_shards(samples: Iterable[dict], out_dir: str | Path, name: str = "shard",
                 samples_per_shard: int = 1000) -> list[ShardRecord]:
    """Pack samples into `name-000000.tar ...` under `out_dir` plus a manifest.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = [write_shard(out / shard_filename(name, i), chunk)
               for i, chunk in enumerate(_chunks(samples, samples_per_shard))]
    write_manifest(out, records)
    return records
