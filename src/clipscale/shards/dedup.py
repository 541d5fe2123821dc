"""`clipscale shards dedup`: exact duplicates by the image bytes' hash, then semantic duplicates as
SemDeDup finds them (Abbas et al. 2023): k-means on the image embeddings, then within each cluster
every pair above a cosine threshold, keeping the sample with the higher CLIP score.

Within a cluster the samples are ordered by CLIP score, highest first; a sample goes when its
cosine to any sample before it is above the threshold (SemDeDup's rule with its order by score:
of a group of near-copies the best captioned one stays). Only the sidecars are read to decide; the
kept samples are copied with every member into shards of the same names, with sidecars, a manifest
and dedup_report.json (counts, example pairs with captions).

Scale: spherical k-means in float32 with torch, sqrt(N) clusters by default, assignments in
blocks; the pairs of a cluster in blocks of rows, so memory stays at O(block x cluster).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..fsutil import atomic_write_bytes
from ..wds.urls import local_path
from .embeddings import copy_kept, finish_folder, output_folder, output_names, prepare_output, read_info
from .score_filter import captions_of, load_sidecars

REPORT = "dedup_report.json"
BLOCK = 65536
EXAMPLES = 8


def kmeans(x: torch.Tensor, k: int, iterations: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(nearest, second nearest) centroid of every row of the L2-normalised `x`. Spherical k-means (centroids
    renormalised after each update) fitted, as faiss does, on at most 256 samples per centroid; then one
    pass assigns every row."""
    gen = torch.Generator().manual_seed(seed)
    fit = x[torch.randperm(len(x), generator=gen)[: 256 * k]] if len(x) > 256 * k else x
    centroids = fit[torch.randperm(len(fit), generator=gen)[:k]].clone()
    for _ in range(iterations):
        assign = _top(fit, centroids, 1)[:, 0]
        sums = torch.zeros_like(centroids).index_add_(0, assign, fit)
        empty = torch.bincount(assign, minlength=k) == 0
        if empty.any():  # an empty cluster restarts at a random sample
            sums[empty] = fit[torch.randint(len(fit), (int(empty.sum()),), generator=gen)]
        centroids = torch.nn.functional.normalize(sums, dim=1)
    top = _top(x, centroids, min(2, k))
    return top[:, 0], top[:, -1]


def _top(x: torch.Tensor, centroids: torch.Tensor, n: int) -> torch.Tensor:
    """The n most similar centroids of every row, in blocks of rows."""
    out = torch.empty(len(x), n, dtype=torch.int64)
    for i in range(0, len(x), BLOCK):
        out[i : i + BLOCK] = (x[i : i + BLOCK] @ centroids.T).topk(n, dim=1).indices
    return out


def near_duplicates(x: torch.Tensor, score: torch.Tensor, nearest: torch.Tensor, second: torch.Tensor, threshold):
    """(removed rows, [(kept row, removed row, cosine)]). Samples are ranked by CLIP score (highest first);
    a sample goes when a sample ranked before it is more similar than `threshold` and the two share a
    cluster among their nearest and second nearest (so near-copies on both sides of a cluster border are
    found too, at about four times the comparisons of SemDeDup's one cluster each)."""
    rank = torch.empty(len(x), dtype=torch.int64)
    rank[torch.argsort(-score, stable=True)] = torch.arange(len(x))
    members = _members(torch.cat([nearest, second]), torch.arange(len(x)).repeat(2))
    removed, pairs, seen = [], [], set()
    for rows in members.values():
        rows = torch.unique(rows)
        if len(rows) < 2:
            continue
        others, others_rank = x[rows], rank[rows]
        for i in range(0, len(rows), 4096):
            block = rows[i : i + 4096]
            sims = (x[block] @ others.T).masked_fill_(others_rank[None, :] >= rank[block][:, None], -2.0)
            best, by = sims.max(1)
            for j in torch.nonzero(best > threshold).flatten().tolist():
                row = int(block[j])
                if row not in seen:
                    seen.add(row)
                    removed.append(row)
                    pairs.append((int(rows[by[j]]), row, float(best[j])))
    return torch.tensor(removed, dtype=torch.int64), pairs


def _members(cluster: torch.Tensor, rows: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """{cluster: its rows} in one sort (not one scan of every row per cluster)."""
    rows = torch.arange(len(cluster)) if rows is None else rows
    order = torch.argsort(cluster, stable=True)
    values, counts = torch.unique_consecutive(cluster[order], return_counts=True)
    return dict(zip(values.tolist(), torch.split(rows[order], counts.tolist())))


def exact_duplicates(sha1: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(removed rows, [(kept row, removed row)]): of each set of equal image bytes the best-scored one stays."""
    order = np.lexsort((-score, sha1))  # by hash, then score high to low
    same = sha1[order][1:] == sha1[order][:-1]
    removed = order[1:][same]
    first = order.copy()  # the kept row of each hash group
    for i in range(1, len(order)):
        if same[i - 1]:
            first[i] = first[i - 1]
    return removed, [(int(first[i + 1]), int(order[i + 1])) for i in np.flatnonzero(same)]


def find_duplicates(tables, threshold: float, clusters: int | None = None) -> dict:
    """What to drop from the embedded shards' tables: {alive (bool per sample, in table order), exact,
    semantic (counts), exact_pairs, semantic_pairs (rows), clusters}."""
    score = np.concatenate([t.clip_score for t in tables]).astype(np.float32)
    sha1 = np.concatenate([t.image_sha1 for t in tables])
    exact, exact_pairs = exact_duplicates(sha1, score)
    alive = np.ones(len(score), dtype=bool)
    alive[exact] = False
    rows = np.flatnonzero(alive)
    # one copy of the kept rows, normalised in place (F.normalize's arithmetic): at 1M x 512 each copy is 2 GB
    x = torch.from_numpy(np.concatenate([t.image for t in tables if len(t)])[rows]).float()  # (empty: no width)
    x.div_(x.norm(dim=1, keepdim=True).clamp_min(1e-12))
    torch.nan_to_num_(x)  # a broken (NaN) embedding is then no one's duplicate and skews no centroid
    k = max(1, min(len(rows), clusters or round(math.sqrt(len(rows)))))
    nearest, second = kmeans(x, k)
    gone, pairs = near_duplicates(x, torch.from_numpy(np.nan_to_num(score[rows], nan=-1.0)), nearest, second, threshold)
    alive[rows[gone.numpy()]] = False
    return {
        "alive": alive, "score": score, "exact": int(len(exact)), "semantic": int(len(gone)), "clusters": k,
        "exact_pairs": exact_pairs, "semantic_pairs": [(int(rows[a]), int(rows[b]), c) for a, b, c in pairs],
    }  # fmt: skip


def dedup_shards(
    source: str, output: str, threshold: float = 0.95, clusters: int | None = None, overwrite: bool = False
) -> dict:
    """Deduplicate `source` into `output`; returns the report (also written as dedup_report.json)."""
    if not 0 < threshold <= 1 or (clusters is not None and clusters < 1):
        raise DataError(
            f"shards dedup: --threshold must be in (0, 1] and --clusters >= 1 (got {threshold}, {clusters})"
        )
    started = time.perf_counter()
    urls, tables = load_sidecars(source, vectors=True)
    names, out = output_names(urls), output_folder(output, urls, "shards dedup")
    keys = [(i, k) for i, t in enumerate(tables) for k in t.keys.tolist()]
    found = find_duplicates(tables, threshold, clusters)
    alive = found["alive"]
    prepare_output(out, overwrite, "shards dedup")
    records, offset = [], 0
    for i, (url, table) in enumerate(zip(urls, tables)):
        record = copy_kept(url, out / names[i], alive[offset : offset + len(table)], table)
        offset += len(table)
        if record is not None:
            records.append(record)
    finish_folder(out, records, {**read_info(Path(local_path(urls[0])).parent), "deduplicated_from": source})
    report = {
        "input": source, "output": output, "samples_in": len(keys), "samples_out": int(alive.sum()),
        "exact_duplicates": found["exact"], "semantic_duplicates": found["semantic"], "threshold": threshold,
        "clusters": found["clusters"], "seconds": time.perf_counter() - started,
        "example_pairs": example_pairs(urls, keys, found["score"], found["exact_pairs"], found["semantic_pairs"]),
    }  # fmt: skip
    atomic_write_bytes(out / REPORT, (json.dumps(report, indent=1) + "\n").encode())
    return report


def example_pairs(urls, keys, score, exact_pairs, semantic_pairs) -> list[dict]:
    """A few pairs of each kind, the kept sample and the removed one, with captions and scores."""
    chosen = [("exact", a, b, 1.0) for a, b in exact_pairs[: EXAMPLES // 2]]
    chosen += [("semantic", a, b, c) for a, b, c in semantic_pairs[: EXAMPLES - len(chosen)]]
    captions = captions_of(urls, {keys[r] for _, a, b, _ in chosen for r in (a, b)})

    def side(row: int) -> dict:
        return {"key": keys[row][1], "shard": Path(urls[keys[row][0]]).name, "clip_score": float(score[row]),
                "caption": captions.get(keys[row])}  # fmt: skip

    return [{"kind": kind, "cosine": cos, "kept": side(a), "removed": side(b)} for kind, a, b, cos in chosen]
