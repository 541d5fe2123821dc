"""DeepSpeed ZeRO resumed at another world size, repeatedly, with the machine loaded: no hang.

A ZeRO checkpoint saved by N ranks and resumed by M != N ranks goes through DeepSpeed's universal
conversion (ds_to_universal, a process pool of its own), which once forked the threaded trainer and
deadlocked in 3 of 3 tries (issue 29). This runs the matrix: ZeRO stages 1, 2, 3 x (2 -> 1, 2 -> 3,
4 -> 2 ranks), each resume `--repeats` times from a copy of the same saved run, while `--load` busy
processes take the CPU, each resume under a deadline (its process group is killed past it: a hang).

For every stage and saving world size one run is trained first (clip-tiny, fp32, CPU, gloo,
`--steps` steps, checkpoint at the end); a resume trains 2 steps more with checkpoint.resume=auto,
and passes when it exits 0 at the right step with status "finished". Prints one line per resume
and a table: stage, case, passed/tries, fastest, median, slowest seconds.

    python benchmarks/zero_reshard.py [--stages 1 2 3] [--cases 2:1 2:3 4:2] [--repeats 5]
                                      [--load 2] [--deadline-s 600] [--dir .bench/zero_reshard]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "model.name=clip-tiny",
    "model.precision=fp32",
    "train.device=cpu",
    "data.batch_size=4",
    "data.workers=1",
    "data.shuffle_buffer=16",
    "logging.progress=false",
    "logging.every_n_steps=1",
    "engine.name=deepspeed",
]


def make_shards(folder: Path) -> str:
    """8 shards x 16 small JPEG + caption pairs, reused when present."""
    from PIL import Image

    from clipscale.shards import write_shards

    if len(list(folder.glob("bench-*.tar"))) != 8:
        folder.mkdir(parents=True, exist_ok=True)

        def jpeg(i: int) -> bytes:
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(buf, "JPEG")
            return buf.getvalue()

        samples = ({"__key__": f"s{i:06d}", "jpg": jpeg(i), "txt": f"colour {i}"} for i in range(128))
        write_shards(samples, folder, "bench", 16)
    return str(folder / "bench-{000000..000007}.tar")


def launch(world: int, run_dir: Path, shards: str, steps: int, stage: int, deadline_s: float) -> tuple[int, float]:
    """(exit code, seconds) of `clipscale.launch` on `world` ranks; -9 when the deadline killed it."""
    cmd = [
        sys.executable, "-m", "clipscale.launch", "--nnodes=1", f"--nproc-per-node={world}",
        "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "-m", "clipscale.train",
        f"run.dir={run_dir}", f"data.train_shards={shards}", *COMMON, f"engine.zero_stage={stage}",
        f"train.steps={steps}", f"checkpoint.every_n_steps={steps}", "checkpoint.resume=auto",
    ]  # fmt: skip
    from clipscale.job.proc import run_with_deadline

    started = time.monotonic()
    try:  # a session of its own: at the deadline the launcher and every rank go
        code = run_with_deadline(cmd, deadline_s, run_dir.parent / f"{run_dir.name}.log")
    except TimeoutError:
        code = -9
    return code, time.monotonic() - started


def finished_at(run_dir: Path, step: int) -> bool:
    try:
        status = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return False
    return status.get("state") == "finished" and status.get("step") == step


def resume_repeatedly(args, saved: Path, shards: str, stage: int, source: int, target: int) -> tuple[list, int]:
    """(seconds of each try, tries passed) of resuming copies of `saved` on `target` ranks."""
    times, passed = [], 0
    for attempt in range(args.repeats):
        run_dir = args.dir / f"zero{stage}-{source}to{target}-{attempt}"
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(saved, run_dir)
        code, took = launch(target, run_dir, shards, args.steps + 2, stage, args.deadline_s)
        ok = code == 0 and finished_at(run_dir, args.steps + 2)
        passed += ok
        times.append(took)
        verdict = "ok" if ok else ("HANG (killed at the deadline)" if code == -9 else f"FAILED exit {code}")
        print(f"ZeRO-{stage} {source} -> {target} ranks, try {attempt + 1}: {took:.1f} s {verdict}", flush=True)
        if ok:
            shutil.rmtree(run_dir, ignore_errors=True)
    return times, passed


def busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--cases", nargs="+", default=["2:1", "2:3", "4:2"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--load", type=int, default=2, help="busy processes beside the jobs")
    parser.add_argument("--steps", type=int, default=3, help="steps of the saved run")
    parser.add_argument("--deadline-s", type=float, default=600)
    parser.add_argument("--dir", type=Path, default=ROOT / ".bench" / "zero_reshard")
    args = parser.parse_args()
    cases = [tuple(map(int, c.split(":"))) for c in args.cases]
    args.dir.mkdir(parents=True, exist_ok=True)
    shards = make_shards(args.dir / "shards")
    loaders = busy(args.load)
    table = []
    try:
        for stage in args.stages:
            for source in sorted({s for s, _ in cases}):
                saved = args.dir / f"zero{stage}-saved{source}"
                if not finished_at(saved, args.steps):
                    shutil.rmtree(saved, ignore_errors=True)
                    saved.mkdir(parents=True)
                    code, took = launch(source, saved, shards, args.steps, stage, args.deadline_s)
                    print(f"ZeRO-{stage}: trained on {source} ranks in {took:.1f} s (exit {code})", flush=True)
                    if code != 0:
                        sys.exit(f"the run to resume failed: see {saved}.log")
                for target in [t for s, t in cases if s == source]:
                    times, passed = resume_repeatedly(args, saved, shards, stage, source, target)
                    table.append((stage, f"{source} -> {target}", passed, len(times), times))
    finally:
        for p in loaders:
            p.kill()
    print(f"\nZeRO resumed at another world size, {args.load} busy processes, deadline {args.deadline_s:.0f} s")
    print(f"{'stage':>5}  {'ranks':>7}  {'passed':>6}  {'fastest':>8}  {'median':>8}  {'slowest':>8}")
    for stage, case, passed, tries, times in table:
        print(
            f"{stage:>5}  {case:>7}  {passed:>3}/{tries:<2}  {min(times):>7.1f}s  {statistics.median(times):>7.1f}s  "
            f"{max(times):>7.1f}s"
        )
    sys.exit(0 if all(p == t for _, _, p, t, _ in table) else 1)


if __name__ == "__main__":
    main()
