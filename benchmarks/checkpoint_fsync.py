"""fsyncs per checkpoint on a cluster file system, at 8, 64 and 1,024 simulated ranks.

A DeepSpeed ZeRO checkpoint folder as W ranks write it (each rank its optimizer shard, rank 0 the
model states and ds_config.json) is made durable the way `CheckpointManager.save` does: the main
rank lists the folder once and hands each rank its share (`durability_shares`), every rank fsyncs
its share (`fsync_paths`). The ranks are simulated one after another in this process; fsync calls
are counted at the system call (os.fsync). Before (every rank fsynced the whole folder) is
measured the same way up to --old-max ranks and computed above it (W x (files + directories)).

    python benchmarks/checkpoint_fsync.py [--ranks 8,64,1024] [--old-max 64] [--dir DIR]

Goal (issue 28): files written + directories, i.e. O(world).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from clipscale.checkpoint.files import durability_shares, fsync_paths  # noqa: E402


class FsyncCounter:
    """Counts os.fsync calls while active (the system-call boundary)."""

    def __init__(self):
        self.count = 0
        self._real = os.fsync

    def __enter__(self):
        def counting(fd):
            self.count += 1
            self._real(fd)

        os.fsync = counting
        return self

    def __exit__(self, *exc):
        os.fsync = self._real


def write_zero_folder(folder: Path, world: int) -> None:
    state = folder / "state"
    state.mkdir(parents=True)
    for rank in range(world):
        (state / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"o" * 64)
    (state / "mp_rank_00_model_states.pt").write_bytes(b"m" * 64)
    (folder / "ds_config.json").write_text("{}\n")


def every_path(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in sorted(folder.rglob("*"))] + ["."]


def measure(root: Path, world: int, old: bool) -> tuple[int, int, float, int]:
    folder = root / f"step-{world}"
    shutil.rmtree(folder, ignore_errors=True)
    write_zero_folder(folder, world)
    files = sum(1 for p in folder.rglob("*") if p.is_file())
    dirs = 1 + sum(1 for p in folder.rglob("*") if p.is_dir())
    start = time.perf_counter()
    with FsyncCounter() as counter:
        shares = durability_shares(folder, world)
        for rank in range(world):
            fsync_paths(folder, shares[rank])
    new = counter.count, time.perf_counter() - start
    old_count = None
    if old:
        with FsyncCounter() as counter:
            for _ in range(world):  # before: every rank fsynced every file and directory
                fsync_paths(folder, every_path(folder))
        old_count = counter.count
    shutil.rmtree(folder)
    return files, dirs, new, old_count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="8,64,1024")
    ap.add_argument("--old-max", type=int, default=64, help="measure the old way up to this many ranks")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="fsync-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"fsyncs per checkpoint (DeepSpeed ZeRO folder, ranks simulated in one process, in {root})")
    print("| ranks | files | directories | fsyncs now | goal (files + dirs) | before (every rank, all) | time now |")
    print("|---|---|---|---|---|---|---|")
    failed = False
    for world in (int(w) for w in args.ranks.split(",")):
        files, dirs, (count, seconds), old = measure(root, world, old=world <= args.old_max)
        before = f"{old:,}" if old is not None else f"{world * (files + dirs):,} (computed)"
        print(f"| {world:,} | {files:,} | {dirs} | {count:,} | {files + dirs:,} | {before} | {seconds:.3f} s |")
        failed |= count != files + dirs
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    if failed:
        print("FAILED: the fsync count is not files + directories")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
