"""`clipscale shards filter`: keep the samples whose CLIP score clears a threshold (DataComp's CLIP-score
filtering), and those whose caption has enough words.

The threshold for `--clip-score-top F` is the score of the F-quantile over the WHOLE input (every
shard), as DataComp computes it, not per shard. Reads only the embeddings' sidecars to decide, then
copies the kept samples, every member as it was, into shards of the same names (a shard left with
nothing is not written), with their sidecars and a manifest. Beside them: filter_report.json (the
threshold, counts per rule, samples just kept and just removed with their captions) and
filter_report.png (the histogram of scores with the threshold).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..fsutil import atomic_write_bytes
from ..wds.schema import Skip, caption_of
from ..wds.tar import iter_raw_samples
from .embeddings import ShardEmbeddings, copy_kept, embedded_shards, finish_folder, prepare_output, read_info
from .scan import shard_urls

REPORT = "filter_report"
EXAMPLES = 5


def load_sidecars(source: str, vectors: bool) -> tuple[list[str], list[ShardEmbeddings]]:
    """(shard URLs, their embeddings) of an embedded shard set; one-line errors for an empty input or one
    without embeddings."""
    urls, _ = shard_urls(source)
    pairs = embedded_shards(urls)
    tables = [ShardEmbeddings.load(sidecar, vectors) for _, sidecar in pairs]
    if not sum(len(t) for t in tables):
        raise DataError(f"{source}: the shards hold no samples")
    return urls, tables


def top_threshold(scores: np.ndarray, fraction: float) -> float:
    """The lowest score among the top `fraction` of all scores (keep score >= it: ties keep a few more)."""
    keep = max(1, math.ceil(fraction * len(scores)))
    return float(np.partition(scores, len(scores) - keep)[len(scores) - keep])


def filter_shards(
    source: str, output: str, top: float | None = None, min_score: float | None = None,
    min_caption_words: int | None = None, overwrite: bool = False,
) -> dict:  # fmt: skip
    """Filter `source` into `output`; returns the report (also written as filter_report.json)."""
    if (top is None) == (min_score is None):
        raise DataError("shards filter: give one of --clip-score-top FRACTION or --clip-score-min VALUE")
    if top is not None and not 0 < top <= 1:
        raise DataError(f"--clip-score-top must be in (0, 1]; got {top}")
    urls, tables = load_sidecars(source, vectors=False)
    scores = np.concatenate([t.clip_score for t in tables])
    threshold = top_threshold(scores, top) if top is not None else float(min_score)
    out = Path(output)
    prepare_output(out, overwrite, "shards filter")
    removed = {"clip_score": 0, "caption_words": 0}
    records, keeps = [], []
    for url, table in zip(urls, tables):
        passes = table.clip_score >= threshold
        words = table.caption_words >= (min_caption_words or 0)
        removed["clip_score"] += int((~passes).sum())
        removed["caption_words"] += int((passes & ~words).sum())
        keep = set(table.keys[passes & words].tolist())
        keeps.append(keep)
        record = copy_kept(url, out, keep, table)
        if record is not None:
            records.append(record)
    finish_folder(out, records, {**read_info(Path(urls[0]).parent), "filtered_from": source})
    report = {
        "input": source, "output": output, "samples_in": int(len(scores)),
        "samples_out": sum(r.samples for r in records), "shards_out": len(records),
        "rule": {"clip_score_top": top, "clip_score_min": min_score, "min_caption_words": min_caption_words},
        "threshold": threshold, "removed": removed,
        "scores": {"min": float(scores.min()), "median": float(np.median(scores)), "max": float(scores.max())},
        **examples(urls, tables, keeps, threshold),
    }  # fmt: skip
    atomic_write_bytes(out / f"{REPORT}.json", (json.dumps(report, indent=1) + "\n").encode())
    report["histogram"] = histogram(scores, threshold, out / f"{REPORT}.png")
    return report


def examples(urls: list[str], tables: list[ShardEmbeddings], keeps: list[set], threshold: float) -> dict:
    """The samples closest to the threshold on both sides, with their captions (read from their shards)."""
    rows = [(float(s), k, i) for i, t in enumerate(tables) for s, k in zip(t.clip_score, t.keys.tolist())]
    kept = sorted((r for r in rows if r[1] in keeps[r[2]]), key=lambda r: r[0])[:EXAMPLES]
    gone = sorted((r for r in rows if r[1] not in keeps[r[2]]), key=lambda r: -r[0])[:EXAMPLES]
    wanted = {(r[2], r[1]) for r in kept + gone}
    captions = captions_of(urls, wanted)
    return {
        "just_kept": [{"key": k, "clip_score": s, "caption": captions.get((i, k))} for s, k, i in kept],
        "just_removed": [{"key": k, "clip_score": s, "caption": captions.get((i, k))} for s, k, i in gone],
    }


def captions_of(urls: list[str], wanted: set[tuple[int, str]]) -> dict:
    """{(shard index, key): caption} of a few samples (each shard named is read once)."""
    found = {}
    for index in sorted({i for i, _ in wanted}):
        keys = {k for i, k in wanted if i == index}
        for sample in iter_raw_samples(urls[index], lambda exn: None):
            if sample["__key__"] in keys:
                try:
                    found[(index, sample["__key__"])] = caption_of(sample)
                except Skip:
                    found[(index, sample["__key__"])] = None
    return found


def histogram(scores: np.ndarray, threshold: float, path: Path) -> str | None:
    """The PNG of the scores with the threshold line; None (and no file) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(scores, bins=min(100, max(10, len(scores) // 20)), color="#4477aa")
    ax.axvline(threshold, color="#cc3311", linestyle="--", label=f"threshold {threshold:.4f}")
    ax.set_xlabel("CLIP score (image-text cosine)")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
