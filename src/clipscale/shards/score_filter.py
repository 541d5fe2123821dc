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
from ..wds.urls import local_path
from .embeddings import (
    ShardEmbeddings,
    copy_kept,
    embedded_shards,
    finish_folder,
    output_folder,
    output_names,
    prepare_output,
    read_info,
)
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
    """The lowest score among the top `fraction` of all finite scores (keep score >= it: ties keep a few
    more; a NaN score, from a broken embedding, is never kept)."""
    finite = scores[np.isfinite(scores)]
    if not len(finite):
        raise DataError("no finite CLIP score in the input: re-embed it")
    keep = max(1, math.ceil(fraction * len(finite)))
    return float(np.partition(finite, len(finite) - keep)[len(finite) - keep])


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
    names, out = output_names(urls), output_folder(output, urls, "shards filter")
    scores = np.concatenate([t.clip_score for t in tables])
    threshold = top_threshold(scores, top) if top is not None else float(min_score)
    passes = [np.nan_to_num(t.clip_score, nan=-np.inf) >= threshold for t in tables]
    keeps = [p & (t.caption_words >= (min_caption_words or 0)) for p, t in zip(passes, tables)]
    kept = int(sum(k.sum() for k in keeps))
    if not kept:
        low, high = np.nanmin(scores), np.nanmax(scores)
        raise DataError(f"shards filter: no sample passes (CLIP score >= {threshold:.4g}, caption words >= "
                        f"{min_caption_words or 0}; the scores go from {low:.4g} to {high:.4g})")  # fmt: skip
    prepare_output(out, overwrite, "shards filter")
    records = [r for i, (url, table, keep) in enumerate(zip(urls, tables, keeps))
               if (r := copy_kept(url, out / names[i], keep, table)) is not None]  # fmt: skip
    finish_folder(out, records, {**read_info(Path(local_path(urls[0])).parent), "filtered_from": source})
    removed_by_score = int(sum((~p).sum() for p in passes))
    report = {
        "input": source, "output": output, "samples_in": int(len(scores)), "samples_out": kept,
        "shards_out": len(records),
        "rule": {"clip_score_top": top, "clip_score_min": min_score, "min_caption_words": min_caption_words},
        "threshold": threshold,
        "removed": {"clip_score": removed_by_score, "caption_words": int(len(scores)) - kept - removed_by_score},
        "scores": {"min": float(np.nanmin(scores)), "median": float(np.nanmedian(scores)),
                   "max": float(np.nanmax(scores)), "nan": int(np.isnan(scores).sum())},
        **examples(urls, tables, passes),
    }  # fmt: skip
    atomic_write_bytes(out / f"{REPORT}.json", (json.dumps(report, indent=1) + "\n").encode())
    report["histogram"] = histogram(scores[np.isfinite(scores)], threshold, out / f"{REPORT}.png")
    return report


def examples(urls: list[str], tables: list[ShardEmbeddings], passes: list[np.ndarray]) -> dict:
    """The samples closest to the score threshold on both sides, with their captions (read from their
    shards; the caption-word rule is left out: these show where the threshold cuts)."""
    kept, gone = [], []
    for i, (table, passed) in enumerate(zip(tables, passes)):
        order = np.argsort(table.clip_score)
        above = [j for j in order if passed[j]][:EXAMPLES]
        below = [j for j in order[::-1] if not passed[j] and np.isfinite(table.clip_score[j])][:EXAMPLES]
        kept += [(float(table.clip_score[j]), str(table.keys[j]), i) for j in above]
        gone += [(float(table.clip_score[j]), str(table.keys[j]), i) for j in below]
    kept, gone = sorted(kept)[:EXAMPLES], sorted(gone, reverse=True)[:EXAMPLES]
    captions = captions_of(urls, {(r[2], r[1]) for r in kept + gone})
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
