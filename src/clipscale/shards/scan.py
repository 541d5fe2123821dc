"""Reading whole shards back: which shards a target names, and what each one holds.

`scan_shard` is shared by `shards index` (counts + hashes → manifest.json) and `shards verify`
(every sample decodes and has a caption; counts and hashes match the manifest).
"""

from __future__ import annotations

import io
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

from PIL import Image

from ..errors import DataError
from ..fsutil import sha256_file
from ..job import workers as worker_processes
from ..wds.manifest import ShardRecord, write_manifest
from ..wds.schema import Skip, caption_of, image_bytes
from ..wds.shardlist import expand, require_shards_exist
from ..wds.tar import iter_raw_samples
from ..wds.urls import local_path, shard_name

T = TypeVar("T")


@dataclass
class ShardScan:
    url: str
    samples: int = 0
    bytes: int = 0
    sha256: str = ""
    problems: list[str] = field(default_factory=list)


def shard_urls(target: str) -> tuple[list[str], Path | None]:
    """The shard URLs of a directory (every *.tar in it) or a pattern, and the folder holding them."""
    path = Path(target)
    if path.is_dir():
        urls = sorted(str(p) for p in path.iterdir() if p.name.endswith((".tar", ".tar.gz")))
        if not urls:
            raise DataError(f"{target}: no .tar shards in this folder")
        return urls, path
    urls = expand(target, "the shard pattern")
    require_shards_exist(urls)
    first = local_path(urls[0])
    return urls, Path(first).parent if first else None


def caption_text(sample: dict) -> str | None:
    """The caption training would read (default keys), or None where training would skip it."""
    try:
        return caption_of(sample)
    except Skip:
        return None


def _image_problem(sample: dict) -> str | None:
    data = image_bytes(sample)
    if data is None:
        return "no image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.open(io.BytesIO(data)).load()
        return None
    except Exception as exn:
        return f"image does not decode ({type(exn).__name__})"


def tar_structure_problem(path: Path) -> str | None:
    """Truncation that tar streaming does not notice: member data past the end of the file, or a
    missing end-of-archive marker (two zero blocks after the last member)."""
    size = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tf:
            members = tf.getmembers()
    except (tarfile.TarError, OSError) as exn:
        return f"truncated or corrupt tar ({type(exn).__name__}: {exn})"
    end = 0
    for m in members:
        end = m.offset_data + -(-m.size // 512) * 512
        if m.offset_data + m.size > size:
            return f"truncated: member {m.name} needs {m.offset_data + m.size} bytes, the file has {size}"
    with open(path, "rb") as f:
        f.seek(end)
        if f.read(1024) != bytes(1024):
            return "truncated: no end-of-archive marker after the last member"
    return None


def scan_shard(url: str, decode: bool = True) -> ShardScan:
    """Read one shard fully; with `decode`, check every sample's image and caption."""
    scan = ShardScan(url)
    path = local_path(url)
    if path is not None:
        scan.bytes = Path(path).stat().st_size
        scan.sha256 = sha256_file(Path(path))
        if decode and (problem := tar_structure_problem(Path(path))):
            scan.problems.append(f"{shard_name(url)}: {problem}")

    def on_error(exn: Exception) -> None:
        scan.problems.append(
            f"{shard_name(url)}: unreadable tar after {scan.samples} samples ({type(exn).__name__}: {exn})"
        )

    for sample in iter_raw_samples(url, on_error):
        scan.samples += 1
        if not decode:
            continue
        problem = _image_problem(sample)
        if problem:
            scan.problems.append(f"{shard_name(url)}: sample {sample['__key__']}: {problem}")
        if caption_text(sample) is None:
            scan.problems.append(f"{shard_name(url)}: sample {sample['__key__']}: no caption (or not UTF-8)")
    return scan


def scan_all(urls: list[str], fn: Callable[[str], T], workers: int) -> list[T]:
    """fn(url) for every shard, in a process pool when workers > 1 (order kept)."""
    if workers <= 1 or len(urls) <= 1:
        return [fn(u) for u in urls]
    worker_processes.start_early()
    with worker_processes.pool(min(workers, len(urls))) as pool:
        return pool.map(fn, urls)


def _count_only(url: str) -> ShardScan:
    return scan_shard(url, decode=False)


def index_shards(target: str, workers: int = 1) -> tuple[Path, list[ShardScan]]:
    """Write manifest.json for any existing local shard set (counts, sizes, hashes)."""
    urls, folder = shard_urls(target)
    if folder is None:
        raise DataError("shards index writes manifest.json next to the shards: give local shards")
    scans = scan_all(urls, _count_only, workers)
    records = [ShardRecord(Path(s.url).name, s.samples, s.bytes, s.sha256) for s in scans]
    return write_manifest(folder, records), scans
