"""Real image-text pairs without a download: scikit-learn's handwritten digits (1,797 scans).

Each 8x8 scan becomes a small "ink on paper" image; training pairs get augmented copies
(rotation, scale, shift, ink and paper colour, noise) and varied natural captions, so the
model must learn the digit, not memorise pixels. The split into train and test is by
source image: no test scan (in any augmentation) is ever trained on.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ..evaluate.prompts import DIGIT_WORDS as WORDS
from ..shards.writer import write_shards

# Captions used for training. Zero-shot evaluation uses other templates (prompts.DIGIT_TEMPLATES).
TRAIN_TEMPLATES = [
    "a handwritten {w}",
    "the digit {d} written in ink",
    "a scan of the number {w}",
    "handwritten number {d}",
    "a {w} drawn by hand",
    "the number {w}, handwritten",
    "an ink drawing of the digit {w}",
    "digit {d}",
    "someone wrote a {w}",
    "a scanned handwritten digit: {w}",
    "the numeral {d} in pen",
    "a small sketch of a {w}",
    "{w}",
    "a messy {w}",
    "a neat {w} written on paper",
]

INKS = [(20, 20, 20), (20, 30, 120), (90, 20, 20), (30, 80, 30)]
PAPERS = [(250, 250, 245), (235, 230, 210), (245, 245, 255), (220, 220, 220)]


@dataclass
class DemoSplit:
    images: np.ndarray  # [n, 8, 8] float in [0, 16]
    labels: np.ndarray  # [n]
    ids: np.ndarray  # index into the original data set


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[DemoSplit, DemoSplit]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = len(digits.target)
    order = np.random.RandomState(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    test, train = order[:n_test], order[n_test:]
    make = lambda idx: DemoSplit(digits.images[idx], digits.target[idx], idx)  # noqa: E731
    return make(train), make(test)


def render_digit(scan: np.ndarray, size: int, rng: random.Random | None = None) -> Image.Image:
    """An 8x8 scan as an RGB image of `size` px: ink on paper, augmented when `rng` is given."""
    ink_level = (scan / 16.0).astype(np.float32)
    base = Image.fromarray((ink_level * 255).astype(np.uint8), mode="L").resize((size, size), Image.BICUBIC)
    ink, paper = INKS[0], PAPERS[0]
    if rng is not None:
        angle = rng.uniform(-15, 15)
        scale = rng.uniform(0.75, 1.05)
        shift = (rng.uniform(-0.1, 0.1) * size, rng.uniform(-0.1, 0.1) * size)
        base = base.rotate(angle, resample=Image.BILINEAR, translate=shift)
        inner = max(4, int(size * scale))
        canvas = Image.new("L", (size, size), 0)
        canvas.paste(base.resize((inner, inner), Image.BILINEAR), ((size - inner) // 2, (size - inner) // 2))
        base = canvas
        if rng.random() < 0.3:
            base = base.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
        ink, paper = rng.choice(INKS), rng.choice(PAPERS)
    alpha = np.asarray(base, dtype=np.float32)[..., None] / 255.0
    rgb = alpha * np.array(ink, np.float32) + (1 - alpha) * np.array(paper, np.float32)
    if rng is not None:
        noise = np.random.RandomState(rng.randrange(2**31)).normal(0, rng.uniform(0, 12), rgb.shape)
        rgb = rgb + noise
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")


def jpeg_bytes(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def train_caption(label: int, rng: random.Random) -> str:
    return rng.choice(TRAIN_TEMPLATES).format(w=WORDS[label], d=label)


def train_samples(split: DemoSplit, copies: int, size: int, seed: int):
    rng = random.Random(seed)
    order = [(i, c) for c in range(copies) for i in range(len(split.labels))]
    rng.shuffle(order)
    for n, (i, c) in enumerate(order):
        label = int(split.labels[i])
        yield {
            "__key__": f"{n:07d}",
            "jpg": jpeg_bytes(render_digit(split.images[i], size, rng)),
            "txt": train_caption(label, rng),
            "json": json.dumps({"label": label, "source_index": int(split.ids[i]), "copy": c}),
        }


def test_samples(split: DemoSplit, size: int, seed: int):
    """Held-out pairs: one clean rendering per test scan, a training-style caption, a `cls` label."""
    rng = random.Random(seed + 1)
    for i in range(len(split.labels)):
        label = int(split.labels[i])
        yield {
            "__key__": f"test{i:05d}",
            "jpg": jpeg_bytes(render_digit(split.images[i], size)),
            "txt": train_caption(label, rng),
            "cls": str(label),
            "json": json.dumps({"label": label, "source_index": int(split.ids[i])}),
        }


def build_demo_shards(
    out_dir: str | Path, copies: int = 4, size: int = 32, samples_per_shard: int = 512, seed: int = 0
) -> dict:
    """Write train/ and test/ shard sets (with manifests) of the digits; returns their patterns."""
    out = Path(out_dir)
    train, test = load_digits_split(seed=seed)
    train_records = write_shards(
        train_samples(train, copies, size, seed), out / "train", "digits-train", samples_per_shard
    )
    test_records = write_shards(test_samples(test, size, seed), out / "test", "digits-test", samples_per_shard)
    pattern = lambda d, recs: str(out / d / f"{recs[0].file.rsplit('-', 1)[0]}-{{000000..{len(recs) - 1:06d}}}.tar")  # noqa: E731
    return {
        "train": pattern("train", train_records),
        "test": pattern("test", test_records),
        "train_samples": sum(r.samples for r in train_records),
        "test_samples": sum(r.samples for r in test_records),
    }
