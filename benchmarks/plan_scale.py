"""A LAION-2B-sized data plan: start-up, and a re-layout after a resume on another world size.

231,000 shards x 10,000 samples (2.31 B samples), 512 ranks x 8 workers interrupted about 20%
into the epoch (every stream at its own point), resumed on 384 ranks x 8 workers. Measures, in
this one process: resolving the shard list from a manifest (with the files present), planning,
the re-layout (CPU seconds, peak memory), that every sample is accounted for exactly (remaining =
epoch - consumed), and the size of the checkpointed layout. `--sources 2` splits the same shards
into a two-source mixture (70/30) and re-lays out both.

    python benchmarks/plan_scale.py [--shards 231000] [--samples 10000] [--old 512x8] [--new 384x8]
                                    [--consumed 0.2] [--sources 1] [--keep-files DIR]

Targets (issue 18): re-layout <= 30 CPU seconds and <= 2 GB peak memory; layout < 64 MB;
resolving + planning 231,000 shards with a manifest < 10 s.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def layout_bytes(plan, positions) -> int:
    import torch

    buf = io.BytesIO()
    torch.save({"layout": plan.layout(), "streams": {s: p.to_state() for s, p in positions.items()}}, buf)
    return buf.tell()


def make_shard_folder(folder: Path, names: list[str], samples: int) -> None:
    """Empty files standing for the shards (only their names are checked) and a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).touch()
    manifest = {"format": "clipscale-manifest/1", "shards": [{"file": n, "samples": samples} for n in names]}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def streams_of(text: str) -> int:
    ranks, workers = (int(x) for x in text.lower().split("x"))
    return ranks * workers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=231_000)
    ap.add_argument("--samples", type=int, default=10_000, help="samples per shard")
    ap.add_argument("--old", default="512x8", help="ranks x workers of the interrupted run")
    ap.add_argument("--new", default="384x8", help="ranks x workers of the resumed run")
    ap.add_argument("--consumed", type=float, default=0.2, help="fraction of the epoch read before the stop")
    ap.add_argument("--sources", type=int, default=1, choices=(1, 2))
    ap.add_argument("--keep-files", help="make the shard folder here and keep it (default: a temporary folder)")
    args = ap.parse_args()

    import torch  # noqa: F401  (a training process has it loaded: count it in the baseline)

    from clipscale.data.plan import StreamPlan
    from clipscale.data.relayout import relayout, remaining_samples
    from clipscale.wds.shardlist import resolve_shards

    old_streams, new_streams = streams_of(args.old), streams_of(args.new)
    width = len(str(args.shards - 1))
    names = [f"{i:0{width}d}.tar" for i in range(args.shards)]
    split = [names] if args.sources == 1 else [names[: int(0.7 * len(names))], names[int(0.7 * len(names)) :]]
    root = Path(args.keep_files) if args.keep_files else Path(tempfile.mkdtemp(prefix="plan_scale_"))
    print(
        f"{args.shards:,} shards x {args.samples:,} samples in {args.sources} source(s); "
        f"{old_streams:,} streams ({args.old}) -> {new_streams:,} ({args.new}); stopped ~{args.consumed:.0%} in"
    )
    t0 = time.perf_counter()
    for i, part in enumerate(split):
        make_shard_folder(root / f"source{i}", part, args.samples)
    print(f"  (made the shard folder(s) in {time.perf_counter() - t0:.1f} s; not part of the figures)")
    base_mb = peak_mb()
    ok = True
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        plans = []
        for i, part in enumerate(split):
            first, last = part[0][:-4], part[-1][:-4]
            shards = resolve_shards(str(root / f"source{i}" / f"{{{first}..{last}}}.tar"))
            plans.append(StreamPlan(shards, 0, old_streams, True, 2, 1000, f"source{i}"))
            plans[-1].fingerprint()  # what a resume compares
        startup_wall, startup_cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(
            f"start-up (resolve shards from the manifest, check the files, plan, fingerprint): "
            f"{startup_wall:.2f} s wall, {startup_cpu:.2f} CPU s   [target < 10 s]"
        )
        ok &= startup_wall < 10

        rng = random.Random(0)
        total_cpu, total_layout = 0.0, 0
        for plan in plans:
            share = plan.total_samples // old_streams
            consumed = {s: int(share * args.consumed * rng.uniform(0.9, 1.1)) for s in range(old_streams)}
            positions = {s: plan.position_after(s, n) for s, n in consumed.items()}
            fresh = StreamPlan(plan.shards, 0, new_streams, True, 2, 1000, plan.name)
            cpu = time.process_time()
            new = relayout(plan, positions, fresh)
            relayout_cpu = time.process_time() - cpu
            total_cpu += relayout_cpu
            remaining, expected = remaining_samples(new), plan.total_samples - sum(consumed.values())
            size = layout_bytes(new, {})
            total_layout += size
            print(
                f"  {plan.name}: {plan.num_shards:,} shards, {plan.total_samples:,} samples; consumed "
                f"{sum(consumed.values()):,}; re-layout {relayout_cpu:.2f} CPU s; remaining {remaining:,} "
                f"(epoch - consumed = {expected:,}: {'exact' if remaining == expected else 'WRONG'}); "
                f"layout {size / 2**20:.1f} MB"
            )
            ok &= remaining == expected
        peak = peak_mb()
        print(
            f"re-layout: {total_cpu:.2f} CPU s   [target <= 30]; peak memory of this process {peak:.0f} MB "
            f"({base_mb:.0f} MB with torch loaded, before planning)   [target <= 2048]; checkpointed layout "
            f"{total_layout / 2**20:.1f} MB   [target < 64]"
        )
        ok &= total_cpu <= 30 and peak <= 2048 and total_layout < 64 * 2**20
    finally:
        if not args.keep_files:
            shutil.rmtree(root, ignore_errors=True)
    print("all within the targets" if ok else "SOME TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
