"""Shard builder throughput against the practical limit: a bare PIL loop doing the same image work.

Generates (once) a few thousand photo-like JPEGs, then measures images/s of
  - bare:      read bytes, decode (with the same JPEG draft downscale), resize, re-encode:
               nothing else, one process;
  - builder:   `clipscale shards build` with 1 and 2 workers (also EXIF orientation, captions,
               keys, tar writing, sha256, per-shard stats, manifest), timed end to end
               including process start-up.
Per-worker efficiency = builder images/s / workers / bare images/s (target >= 0.8).

    python benchmarks/shard_build.py [--n 2000] [--max-size 256]
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_data import make_images
from PIL import Image


def bare_loop(folder: Path, n: int, max_size: int, quality: int) -> float:
    """images/s of decode + resize + re-encode with PIL only (same operations as the builder)."""
    files = sorted(folder.glob("*.jpg"))[:n]
    t0 = time.perf_counter()
    for path in files:
        img = Image.open(io.BytesIO(path.read_bytes()))
        w, h = img.size
        scale = max_size / min(w, h)
        target = (max(1, round(w * scale)), max(1, round(h * scale))) if scale < 1 else (w, h)
        if target != (w, h):
            img.draft("RGB", (max(target), max(target)))
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
        if target != img.size:
            img = img.resize(target, Image.BICUBIC, reducing_gap=None)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
    return len(files) / (time.perf_counter() - t0)


def builder(table: Path, out: Path, workers: int, max_size: int, quality: int, per_shard: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "clipscale",
        "shards",
        "build",
        "--input",
        str(table),
        "--output",
        str(out),
        "--name",
        "bench",
        "--samples-per-shard",
        str(per_shard),
        "--max-size",
        str(max_size),
        "--quality",
        str(quality),
        "--workers",
        str(workers),
        "--no-progress",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    import json

    stats = json.loads((out / "stats.json").read_text())
    return stats["read"] / wall, stats["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--max-size", type=int, default=256)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--samples-per-shard", type=int, default=250)
    ap.add_argument("--workdir", default=".bench/shard_build")
    args = ap.parse_args()
    work = Path(args.workdir)
    table = make_images(work / "images", args.n, (args.width, args.height))
    print(
        f"{args.n} JPEGs of {args.width}x{args.height}, --max-size {args.max_size} (shorter side), "
        f"quality {args.quality}"
    )
    bare = max(bare_loop(work / "images", args.n, args.max_size, args.quality) for _ in range(2))
    print(f"bare PIL loop (1 process)        : {bare:8.1f} images/s  (the practical limit per worker)")
    for workers in (1, 2):
        wall_rate, internal = builder(
            table, work / f"out{workers}", workers, args.max_size, args.quality, args.samples_per_shard
        )
        print(
            f"clipscale shards build, {workers} worker(s): {wall_rate:8.1f} images/s end to end "
            f"({internal:.1f} inside the build) -> {wall_rate / workers / bare:.0%} of the limit per worker"
        )


if __name__ == "__main__":
    main()
