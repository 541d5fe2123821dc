"""`clipscale data plan`: what a run's data mixture will do, without training (and without torch).

For each source: shards, samples, its share of every batch, samples per optimizer step, and how
many of its epochs `train.steps` covers - with a warning for a source that would repeat more than
`max_repeats` times, or never finish one epoch.
"""

from __future__ import annotations

from ..config import BatchLayout, Config
from .sources import build_sources, epoch_samples


def plan_report(cfg: Config, world_size: int = 1) -> dict:
    """The figures `clipscale data plan` prints, as a mapping (also its --json output)."""
    layout = BatchLayout.of(cfg.data, cfg.optim, world_size)
    workers = layout.workers
    sources = build_sources(cfg.data, cfg.seed, layout.streams)
    batch = layout.global_batch
    total_weight = sum(s.weight for s in sources)
    rows = []
    for s in sources:
        share = s.weight / total_weight
        per_step = batch * share
        rows.append(
            {
                "name": s.name,
                "shards": s.plan.num_shards,
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
    cols = ["source", "shards", "samples", "share", "repeat", "per step", f"epochs in {steps} steps"]
    cells = [
        [
            r["name"],
            str(r["shards"]),
            str(r["samples"]),
            f"{r['share']:.4f}",
            "-" if r["repeat"] is None else f"{r['repeat']:g}",
            f"{r['samples_per_step']:.2f}",
            f"{r['epochs']:.2f}",
        ]
        for r in report["sources"]
    ]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [head, "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines + warnings(report, max_repeats)) + "\n"
