"""Benchmark inputs shared by the scripts in benchmarks/: photo-like JPEGs and shards of them.

The images are generated (no download): a low-resolution random colour field scaled up with
bicubic interpolation plus fine noise, which JPEG-encodes and decodes like a photo of the same
size. Captions name the image's tint among ten colours, so a CLIP model has something to learn
and both trainers' loss curves are comparable.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TINTS = {
    "red": (200, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 200),
    "yellow": (220, 200, 40),
    "purple": (130, 50, 170),
    "orange": (230, 120, 30),
    "pink": (230, 120, 170),
    "cyan": (40, 190, 200),
    "brown": (120, 80, 40),
    "grey": (128, 128, 128),
}


def make_images(folder: Path, n: int, size: tuple[int, int], tinted: bool = False) -> Path:
    """n JPEGs of `size` (width, height) and a pairs.csv (filepath, caption); reused when present."""
    table = folder / "pairs.csv"
    if table.is_file() and len(list(folder.glob("*.jpg"))) >= n:
        return table
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    names = list(TINTS)
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption"])
        for i in range(n):
            field = rng.randint(0, 255, (6, 8, 3)).astype(np.float32)
            caption = f"a generated photo number {i} with soft colours"
            if tinted:
                name = names[i % len(names)]
                field = 0.4 * field + 0.6 * np.array(TINTS[name], dtype=np.float32)
                caption = f"a photo with a {name} tint, picture {i}"
            low = Image.fromarray(field.astype(np.uint8)).resize(size, Image.BICUBIC)
            arr = np.asarray(low, dtype=np.int16) + rng.randint(-20, 20, (size[1], size[0], 3))
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)
            w.writerow([f"{i:06d}.jpg", caption])
    return table


def build_shards(table: Path, out: Path, per_shard: int, name: str = "bench") -> list[Path]:
    """WebDataset shards of the pairs with `clipscale shards build` (kept as they are: no resize)."""
    shards = sorted(out.glob(f"{name}-*.tar"))
    if shards and (out / "stats.json").is_file():
        return shards
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
        name,
        "--samples-per-shard",
        str(per_shard),
        "--workers",
        "2",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"shard build failed:\n{proc.stderr}")
    return sorted(out.glob(f"{name}-*.tar"))


def shard_pattern(shards: list[Path]) -> str:
    """A brace pattern naming exactly these shards (both trainers expand it with braceexpand)."""
    first, last = shards[0].stem, shards[-1].stem
    prefix, a = first.rsplit("-", 1)
    b = last.rsplit("-", 1)[1]
    return str(shards[0].parent / f"{prefix}-{{{a}..{b}}}.tar")
