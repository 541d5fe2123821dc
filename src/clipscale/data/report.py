"""`clipscale data plan`: what a run's data mixture will do, without training (and without torch).

For each source: shards found and missing, where their counts came from (manifest, the run's count
cache, img2dataset stats, reading), samples, its share of every batch, streams, samples per
optimizer step, and how many of its epochs `train.steps` covers - with a warning for a source that
would repeat more than `max_repeats` times, or never finish one epoch. The counts are made by the
trainer's own census (wds/census.py) into the same cache (RUN_DIR/shard_counts.json); past
`count_budget_s` the shards left are estimated, with the time counting them would take.
"""

from __future__ import annotations

from pathlib import Path

from ..config import BatchLayout, Config
from ..wds.census import CACHE_NAME
from .sources import build_sources, epoch_samples


def plan_report(cfg: Config, world_size: int = 1, count_budget_s: float | None = 30.0) -> dict:
    """The figures `clipscale data plan` prints, as a mapping (also its --json output)."""
    layout = BatchLayout.of(cfg.data, cfg.optim, world_size)
    workers = layout.workers
    cache = Path(cfg.run.dir) / CACHE_NAME if cfg.run.dir else None
    census = {"cache_path": cache, "budget_s": count_budget_s}
    sources = build_sources(cfg.data, cfg.seed, layout.streams, estimate=True, **census)
    batch = layout.global_batch
    total_weight = sum(s.weight for s in sources)
    rows = []
    # counts made now, over all sources, per second of the census: what the shards left would take
    origins = [s.found.by_origin() for s in sources]
    counted_now = sum(o["stats"] + o["reading"] for o in origins)
    seconds = sources[0].found.seconds if sources else 0.0
    rate = counted_now / seconds if seconds > 0 and counted_now else None
    for s, origin in zip(sources, origins):
        share = s.weight / total_weight
        per_step = batch * share
        rows.append(
            {
                "name": s.name,
                "shards": s.plan.num_shards,
                "missing": s.missing,
                "counted_from": {k: v for k, v in origin.items() if k != "left"},
                "estimated_shards": s.found.estimated,
                "count_rest_s": s.found.estimated / rate if rate and s.found.estimated else 0.0,
                "streams": s.plan.num_streams,
                "samples": s.samples,
                "share": share,
                "repeat": s.repeat,
                "samples_per_step": per_step,
                "epochs": cfg.train.steps * per_step / s.samples,
            }
        )
    return {
        "world_size": world_size,
        "workers": workers,
        "global_batch": batch,
        "steps": cfg.train.steps,
        "epoch_samples": cfg.data.train_num_samples or epoch_samples(sources),
        "sources": rows,
    }


def warnings(report: dict, max_repeats: float) -> list[str]:
    out = []
    for row in report["sources"]:
        if row["epochs"] > max_repeats:
            out.append(
                f"warning: source {row['name']} would repeat {row['epochs']:.1f} times in "
                f"train.steps={report['steps']} (more than {max_repeats:g}): lower its weight or add data"
            )
        elif row["epochs"] < 1:
            out.append(
                f"warning: source {row['name']} would not finish one epoch in train.steps={report['steps']} "
                f"({row['epochs']:.2f} of it): some of its samples are never seen"
            )
    return out


def format_report(report: dict, max_repeats: float) -> str:
    steps = report["steps"]
    head = (
        f"{report['world_size']} rank(s) x {report['workers']} worker(s), global batch {report['global_batch']}, "
        f"{steps} steps; one epoch = {report['epoch_samples']} samples"
    )
    cols = ["source", "shards", "missing", "counted from", "samples", "share", "repeat", "streams", "per step"]
    cols.append(f"epochs in {steps} steps")
    cells = [
        [
            r["name"],
            str(r["shards"]),
            str(r["missing"]),
            counted_from(r),
            ("~" if r["estimated_shards"] else "") + str(r["samples"]),
            f"{r['share']:.4f}",
            "-" if r["repeat"] is None else f"{r['repeat']:g}",
            str(r["streams"]),
            f"{r['samples_per_step']:.2f}",
            f"{r['epochs']:.2f}",
        ]
        for r in report["sources"]
    ]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [head, "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines + estimates(report) + warnings(report, max_repeats)) + "\n"


def counted_from(row: dict) -> str:
    parts = [f"{how} {n}" for how, n in row["counted_from"].items() if n]
    if row["estimated_shards"]:
        parts.append(f"estimated {row['estimated_shards']}")
    return ", ".join(parts) or "-"


def estimates(report: dict) -> list[str]:
    return [
        f"note: source {r['name']}: {r['estimated_shards']} shard(s) not counted in the time given (--count-budget); "
        f"their samples are the mean of the others' (~). Counting them takes about {r['count_rest_s']:.0f} s more "
        f"in one process (training counts once per job, over all ranks, into RUN_DIR/{CACHE_NAME})"
        for r in report["sources"]
        if r["estimated_shards"]
    ]
