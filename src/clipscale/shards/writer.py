"""Writing WebDataset shards: one tar per shard, written under a temporary name, then renamed.

Members are laid out as webdataset's TarWriter does (USTAR, `{key}.{ext}` in sorted extension
order, mode 0444) with a fixed mtime, so the same samples always give byte-identical shards.
We write with the standard library's tarfile rather than webdataset's TarWriter only because
importing webdataset imports torch (3 s per command); shard tools should start instantly.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

from ..fsutil import fsync_dir, sha256_file, temp_path
from ..wds.manifest import ShardRecord, write_manifest

MTIME = 0  # reproducible tars
OWNER = "clipscale"


def shard_filename(name: str, index: int) -> str:
    return f"{name}-{index:06d}.tar"


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = MTIME
    info.mode = 0o444
    info.uname = info.gname = OWNER
    tf.addfile(info, io.BytesIO(data))


def write_sample(tf: tarfile.TarFile, sample: dict) -> None:
    """{"__key__": str, ext: bytes|str, ...} → members {key}.{ext}, extensions in sorted order."""
    key = sample["__key__"]
    for ext in sorted(k for k in sample if not k.startswith("_")):
        value = sample[ext]
        _add(tf, f"{key}.{ext}", value.encode("utf-8") if isinstance(value, str) else bytes(value))


def write_shard(path: Path, samples: Iterable[dict]) -> ShardRecord:
    """Write `samples` to `path` atomically (temp name, fsync, rename)."""
    path = Path(path)
    tmp = temp_path(path)
    count = 0
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for sample in samples:
                write_sample(tf, sample)
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


def write_shards(
    samples: Iterable[dict], out_dir: str | Path, name: str = "shard", samples_per_shard: int = 1000
) -> list[ShardRecord]:
    """Pack samples into `name-000000.tar ...` under `out_dir` plus a manifest.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = [
        write_shard(out / shard_filename(name, i), chunk) for i, chunk in enumerate(_chunks(samples, samples_per_shard))
    ]
    write_manifest(out, records)
    return records
