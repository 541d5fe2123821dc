"""Training stages on the demo (issue 32): the demo as it is (one stage: 32 px, 32 tokens, batch 128) against
the same samples in two stages, CLIPA-style: the first ones with short texts (16 tokens: the demo's captions
have at most 9) at twice the batch (and, with --small-image, smaller images), then the model's own 32 px and
32 tokens at the demo's batch. Both on the demo's digit shards with its 2 processes, one after the other on
this machine, per seed.

Prints each run's training time (the launch of its processes to their end: start-up, data, training,
evaluations, checkpoints), held-out zero-shot top-1, image->text R@1 and the last loss, and each stage's
median throughput (samples/s over the logged windows, none of which mixes two stages).

    python benchmarks/stages.py --seeds 0,1              # 16 tokens, batch 256 for 2/3 of the samples
    python benchmarks/stages.py --seeds 0,1 --small-image 16 --small-batch 128 --small-samples 25600
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path


def stage_throughput(run: Path) -> dict:
    """Median samples/s of the logged steps of each stage (a run without stages: stage 0)."""
    from clipscale.metrics import read_jsonl

    by_stage: dict[int, list[float]] = {}
    for r in read_jsonl(run / "metrics.jsonl"):
        if "samples_per_s" in r:
            by_stage.setdefault(r.get("stage", 0), []).append(r["samples_per_s"])
    return {stage: statistics.median(v) for stage, v in sorted(by_stage.items())}


def demo(run: Path, data: Path, steps: int, overrides: list[str]) -> dict:
    """The demo in `run` on the digit shards in `data` (built before, outside the timing)."""
    from clipscale.demo.run import run_demo

    run.mkdir(parents=True, exist_ok=True)
    if not (run / "data").exists():
        (run / "data").symlink_to(data.resolve())
    result = run_demo(run_dir=str(run), steps=steps, nproc=2, overrides=overrides)
    return {**result, "throughput": stage_throughput(run)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="the one-stage run's steps (batch 128)")
    parser.add_argument("--small-samples", type=int, default=51200, help="samples of the first stage")
    parser.add_argument("--small-batch", type=int, default=256, help="global batch of the first stage")
    parser.add_argument("--small-context", type=int, default=16, help="text tokens of the first stage")
    parser.add_argument("--small-image", type=int, default=32, help="image side of the first stage (patch 8)")
    parser.add_argument("--seeds", default="0", help="comma-separated run seeds (each runs both)")
    parser.add_argument("--dir", default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args()

    from clipscale.demo.run import prepare_data

    root = Path(args.dir or tempfile.mkdtemp(prefix="clipscale-stages-"))
    batch, total = 128, 128 * args.steps  # the demo's global batch: 64 x 2 processes
    steps = -(-args.small_samples // args.small_batch) + -(-(total - args.small_samples) // batch)  # the same samples
    small = (f"{{until_samples: {args.small_samples}, image_size: {args.small_image}, context_length: "
             f"{args.small_context}, batch_size: {args.small_batch}}}")  # fmt: skip
    two = [f"schedule.stages=[{small}, {{image_size: 32, context_length: 32, batch_size: {batch}}}]"]
    prepare_data(root / "data")  # the digit shards, built once for every run
    print(f"\none stage: {args.steps} steps at batch {batch}, 32 px, 32 tokens; two stages: {args.small_samples} "
          f"samples at batch {args.small_batch}, {args.small_image} px, {args.small_context} tokens, then 32 px and "
          f"32 tokens at batch {batch} ({steps} steps, the same {total} samples)")  # fmt: skip
    lines = [f"{'seed':<5} {'run':<12} {'train s':>8} {'zero-shot':>10} {'i2t R@1':>8} {'last loss':>10}  samples/s"]
    for seed in [int(s) for s in args.seeds.split(",")]:
        results = {}
        for name, run_steps, overrides in (("one stage", args.steps, []), ("two stages", steps, two)):
            run = root / f"seed{seed}-{name.replace(' ', '-')}"
            results[name] = demo(run, root / "data", run_steps, [f"seed={seed}", *overrides])
        for name, r in results.items():
            rates = ", ".join(f"stage {s}: {v:.0f}" for s, v in r["throughput"].items())
            top1, r1 = 100 * r["eval/zeroshot_top1"], 100 * r["eval/i2t_r1"]
            lines.append(f"{seed:<5} {name:<12} {r['train_seconds']:>8.1f} {top1:>9.1f}% {r1:>7.1f}% "
                         f"{r['last_loss']:>10.3f}  {rates}")  # fmt: skip
        one, two_run = results["one stage"], results["two stages"]
        ratio = two_run["train_seconds"] / one["train_seconds"]
        gap = 100 * (two_run["eval/zeroshot_top1"] - one["eval/zeroshot_top1"])
        lines.append(f"{seed:<5} two stages / one stage: time x{ratio:.2f}, zero-shot {gap:+.1f} points")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
