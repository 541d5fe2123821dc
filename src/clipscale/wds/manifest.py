"""Shard indexes: clipscale's manifest.json and the ones other tools write.

Exact resume and world-size-independent epochs need every shard's sample count before it is
read. `read_index` reads any index a shard set may come with - clipscale's `manifest.json`
(file, samples, bytes, sha256), OpenCLIP's `sizes.json`, a wids index (`shardlist` entries) -
into `ShardRecord`s keyed by file name; `write_manifest` writes clipscale's.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from ..errors import DataError
from ..fsutil import atomic_write_bytes
from .urls import shard_name

MANIFEST_NAME = "manifest.json"
INDEX_NAMES = (MANIFEST_NAME, "sizes.json")  # looked for next to the shards, in this order
FORMAT = "clipscale-manifest/1"


@dataclass
class ShardRecord:
    file: str
    samples: int
    bytes: int | None = None
    sha256: str | None = None


def write_manifest(directory: Path, records: Iterable[ShardRecord], extra: dict | None = None) -> Path:
    records = sorted(records, key=lambda r: r.file)
    data = {
        "format": FORMAT,
        "total_samples": sum(r.samples for r in records),
        "shards": [asdict(r) for r in records],
        **(extra or {}),
    }
    path = Path(directory) / MANIFEST_NAME
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())
    return path


def parse_index(data, where: str) -> dict[str, ShardRecord]:
    """Records by shard file name from a parsed index of any supported format."""
    try:
        if isinstance(data, dict) and isinstance(data.get("shards"), list):  # clipscale manifest
            return {
                str(s["file"]): ShardRecord(str(s["file"]), int(s["samples"]), s.get("bytes"), s.get("sha256"))
                for s in data["shards"]
            }
        if isinstance(data, dict) and isinstance(data.get("shardlist"), list):  # wids index
            records = [ShardRecord(shard_name(str(s["url"])), int(s["nsamples"])) for s in data["shardlist"]]
            return {r.file: r for r in records}
        if isinstance(data, dict) and data and all(isinstance(v, int) for v in data.values()):  # sizes.json
            return {os.path.basename(k): ShardRecord(os.path.basename(k), int(v)) for k, v in data.items()}
    except (KeyError, TypeError, ValueError):
        pass
    raise DataError(f"{where}: not a shard index (expected a clipscale manifest, sizes.json or wids index)")


def read_index(path: str | Path) -> dict[str, ShardRecord]:
    """Records by shard file name from the index file at `path` (any supported format)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"manifest not found: {path}") from None
    except (OSError, ValueError) as exn:
        raise DataError(f"cannot read {path}: {exn}") from None
    return parse_index(data, str(path))
