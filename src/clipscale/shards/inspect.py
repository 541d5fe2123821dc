"""`clipscale shards inspect`: what a shard set holds, for a person to look at.

Counts, caption-length statistics, an image-size histogram, the first samples, and optionally a
contact-sheet PNG of a few images with their captions.
"""

from __future__ import annotations

import io
import statistics
import textwrap
from pathlib import Path

from ..wds.schema import image_bytes
from ..wds.tar import iter_raw_samples
from .scan import caption_text, scan_all, shard_urls

SIZE_BUCKETS = (64, 128, 256, 512, 1024, 2048)


def _bucket(size: tuple[int, int]) -> str:
    side = max(size)
    for b in SIZE_BUCKETS:
        if side <= b:
            return f"<= {b} px"
    return f"> {SIZE_BUCKETS[-1]} px"


def first_samples(urls: list[str], n: int) -> list[dict]:
    out: list[dict] = []
    for url in urls:
        for sample in iter_raw_samples(url, on_error=lambda e: None):
            out.append(sample)
            if len(out) >= n:
                return out
    return out


def contact_sheet(samples: list[dict], path: Path, columns: int = 5) -> Path:
    """A grid of the samples' images with their (wrapped) captions, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = max(1, -(-len(samples) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, sample in zip(axes.flat, samples):
        data = image_bytes(sample)
        if data is not None:
            try:
                ax.imshow(Image.open(io.BytesIO(data)).convert("RGB"))
            except Exception:
                ax.text(0.5, 0.5, "undecodable image", ha="center", va="center")
        caption = caption_text(sample) or "(no caption)"
        ax.set_title("\n".join(textwrap.wrap(caption, 28)[:3]) + f"\n[{sample['__key__']}]", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def inspect_shards(target: str, n: int = 5, grid: str | None = None, workers: int = 1) -> str:
    """A human-readable report (and the contact sheet at `grid`)."""
    urls, _ = shard_urls(target)
    scans = scan_all(urls, _captions_and_sizes, workers)
    total = sum(s["samples"] for s in scans)
    captions = [c for s in scans for c in s["captions"]]
    sizes = [z for s in scans for z in s["sizes"]]
    lines = [
        f"{len(urls)} shard(s), {total} samples "
        f"(per shard: min {min(s['samples'] for s in scans)}, max {max(s['samples'] for s in scans)})"
    ]
    if captions:
        chars = [len(c) for c in captions]
        words = [len(c.split()) for c in captions]
        lines.append(
            f"captions: {len(captions)} | chars min {min(chars)} median {statistics.median(chars):.0f} "
            f"mean {statistics.mean(chars):.1f} max {max(chars)} | words median "
            f"{statistics.median(words):.0f} max {max(words)}"
        )
    lines.append(f"missing/undecodable captions: {total - len(captions)}")
    if sizes:
        hist: dict[str, int] = {}
        for z in sizes:
            hist[_bucket(z)] = hist.get(_bucket(z), 0) + 1
        order = [f"<= {b} px" for b in SIZE_BUCKETS] + [f"> {SIZE_BUCKETS[-1]} px"]
        width = max(hist.values())
        lines.append("image size (longer side):")
        for label in order:
            if label in hist:
                bar = "#" * max(1, round(40 * hist[label] / width))
                lines.append(f"  {label:>10} {hist[label]:>8}  {bar}")
    samples = first_samples(urls, n)
    lines.append(f"first {len(samples)} sample(s):")
    for s in samples:
        exts = ",".join(sorted(k for k in s if not k.startswith("__")))
        lines.append(f"  {s['__key__']} [{exts}] {caption_text(s) or '(no caption)'}")
    if grid:
        contact_sheet(samples, Path(grid))
        lines.append(f"contact sheet: {grid}")
    return "\n".join(lines)


def _captions_and_sizes(url: str) -> dict:
    import warnings

    from PIL import Image

    out = {"samples": 0, "captions": [], "sizes": []}
    for sample in iter_raw_samples(url, on_error=lambda e: None):
        out["samples"] += 1
        caption = caption_text(sample)
        if caption is not None:
            out["captions"].append(caption)
        data = image_bytes(sample)
        if data is not None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out["sizes"].append(Image.open(io.BytesIO(data)).size)  # header only, no decode
            except Exception:
                pass
    return out
