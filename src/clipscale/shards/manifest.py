"""manifest.json: every shard's file name, sample count, byte size and sha256.

The training pipeline reads sample counts from it (exact resume needs them before reading a
shard); `clipscale shards verify` checks counts and hashes against it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from ..fsutil import atomic_write_bytes, sha256_file

MANIFEST_NAME = "manifest.json"

FORMAT = "clipscale-manifest/1"
__all__ = ["MANIFEST_NAME", "ShardRecord", "read_manifest", "sha256_file", "write_manifest"]


@dataclass
class ShardRecord:
    file: str
    samples: int
    bytes: int
    sha256: str


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


def read_manifest(directory: Path) -> list[ShardRecord]:
    data = json.loads((Path(directory) / MANIFEST_NAME).read_text())
    return [ShardRecord(**{k: s[k] for k in ("file", "samples", "bytes", "sha256")}) for s in data["shards"]]
