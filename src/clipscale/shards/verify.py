"""`clipscale shards verify`: every shard reads, every sample decodes and has a caption, and the
manifest's counts, sizes and hashes match the files."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ..wds.manifest import MANIFEST_NAME, read_index
from .scan import scan_all, scan_shard, shard_urls


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shards(target: str, workers: int = 1) -> VerifyReport:
    urls, folder = shard_urls(target)
    scans = scan_all(urls, partial(scan_shard, decode=True), workers)
    report = VerifyReport(shards=len(scans), samples=sum(s.samples for s in scans))
    for s in scans:
        report.problems.extend(s.problems)
    if folder is None or not (folder / MANIFEST_NAME).is_file():
        report.problems.append("no manifest.json next to the shards (write one with `clipscale shards index`)")
        return report
    listed = read_index(folder / MANIFEST_NAME)
    found = {Path(s.url).name: s for s in scans}
    for name, s in found.items():
        entry = listed.get(name)
        if entry is None:
            if Path(target).is_dir():
                report.problems.append(f"{name}: not listed in manifest.json")
            continue
        if entry.samples != s.samples:
            report.problems.append(f"{name}: manifest says {entry.samples} samples, the tar holds {s.samples}")
        if entry.bytes is not None and entry.bytes != s.bytes:
            report.problems.append(f"{name}: manifest says {entry.bytes} bytes, the file has {s.bytes}")
        if entry.sha256 and entry.sha256 != s.sha256:
            report.problems.append(f"{name}: sha256 differs from manifest.json")
    if Path(target).is_dir():
        for name in sorted(set(listed) - set(found)):
            report.problems.append(f"{name}: listed in manifest.json but missing")
    return report
