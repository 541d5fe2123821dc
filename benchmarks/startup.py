"""Start-up of `clipscale train` on a LAION-2B-sized shard list: launch to the first step.

Builds (once, kept under --dir) a few real tiny tar shards and a folder of 231,000 shard files
that are hard links to them (symlinks where hard links fail), with a manifest.json giving each
its true sample count. Then runs the real CLI, `clipscale train` (clip-tiny, fp32, CPU, batch 16,
2 steps), as a subprocess: once on the 231,000 shards and once on 4 shards (the baseline: the
same process with a trivial shard list), and times from the launch to the first step's line in
metrics.jsonl (polled). The trainer's own "start-up:" log line splits the set-up into model
build and data (resolve the shards, plan the streams). The difference of the two launches is what
231,000 shards cost. `--ranks 2` also runs both under torchrun with 2 processes.

    python benchmarks/startup.py [--shards 231000] [--repeats 1] [--ranks 1] [--workers 1]
                                 [--dir .bench/startup]

Target (issue 23): start-up with 231,000 shards < 15 s plus model build.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

REAL_SHARDS = 8  # hard links per inode stay far below ext4's 65,000 limit
PER_SHARD = 32
BASELINE_SHARDS = 4


def tiny_jpeg(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_real_shards(folder: Path) -> list[Path]:
    """REAL_SHARDS tars of PER_SHARD 32x32 JPEG + caption pairs (and their manifest.json)."""
    from clipscale.shards import write_shards

    shards = sorted(folder.glob("real-*.tar"))
    if len(shards) == REAL_SHARDS:
        return shards
    samples = (
        {"__key__": f"s{i:06d}", "jpg": tiny_jpeg(i), "txt": f"a picture number {i}"}
        for i in range(REAL_SHARDS * PER_SHARD)
    )
    write_shards(samples, folder, "real", PER_SHARD)
    return sorted(folder.glob("real-*.tar"))


def make_shard_folder(folder: Path, real: list[Path], n: int, name: str) -> str:
    """n shard files `name-000000.tar ...` linking to the real tars in turn, and a manifest.json
    with each one's record (samples, bytes, sha256: what `clipscale shards index` writes); reused
    when complete. Returns the brace pattern."""
    width = 6
    names = [f"{name}-{i:0{width}d}.tar" for i in range(n)]
    pattern = str(folder / f"{name}-{{{0:0{width}d}..{n - 1:0{width}d}}}.tar")
    manifest = folder / "manifest.json"
    if manifest.is_file() and len(os.listdir(folder)) == n + 1:
        return pattern
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i, file in enumerate(names):
        target = real[i % len(real)]
        try:
            os.link(target, folder / file)
        except OSError:
            os.symlink(target, folder / file)
    index = {r["file"]: r for r in json.loads((real[0].parent / "manifest.json").read_text())["shards"]}
    records = [{**index[real[i % len(real)].name], "file": file} for i, file in enumerate(names)]
    data = {"format": "clipscale-manifest/1", "total_samples": sum(r["samples"] for r in records), "shards": records}
    manifest.write_text(json.dumps(data, indent=1) + "\n")
    return pattern


def first_step_line(path: Path) -> bool:
    try:
        with open(path) as f:
            return '"step": 1' in f.readline()
    except OSError:
        return False


STARTUP_LINE = re.compile(
    r"start-up: (?P<total>[\d.]+) s .*model (?P<model>[\d.]+) s, data (?P<data>[\d.]+) s, "
    r"first batch wait (?P<wait>[\d.]+) s"
)


def launch(pattern: str, run_dir: Path, ranks: int, workers: int, timeout: float = 600) -> dict:
    """One `clipscale train` launch: seconds from the launch to the first step in metrics.jsonl,
    and the trainer's own split of its set-up (from its 'start-up:' log line)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        f"run.dir={run_dir}",
        f"data.train_shards={pattern}",
        "model.name=clip-tiny",
        "model.precision=fp32",
        "data.batch_size=16",
        f"data.workers={workers}",
        "train.steps=2",
        "train.device=cpu",
        "logging.every_n_steps=1",
        "logging.progress=false",
        "checkpoint.every_n_steps=1000",
        "checkpoint.save_final=false",
    ]
    bin_dir = Path(sys.executable).parent
    if ranks == 1:
        cmd = [str(bin_dir / "clipscale"), "train", *overrides]
    else:
        cmd = [
            str(bin_dir / "torchrun"),
            "--standalone",
            f"--nproc_per_node={ranks}",
            "-m",
            "clipscale.train",
            *overrides,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    metrics = run_dir / "metrics.jsonl"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = None
    while proc.poll() is None and first is None:
        if first_step_line(metrics):
            first = time.perf_counter() - t0
            break
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            break
        time.sleep(0.01)
    out, err = proc.communicate()
    total = time.perf_counter() - t0
    if proc.returncode != 0 or first is None:
        raise SystemExit(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{err[-4000:]}")
    found = STARTUP_LINE.search(err)
    split = {k: float(v) for k, v in found.groupdict().items()} if found else {}
    return {"first_step": first, "exit": total, **split}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=231_000)
    ap.add_argument("--repeats", type=int, default=1, help="launches of each kind (the figures are the best)")
    ap.add_argument("--ranks", type=int, default=1, help="processes (2: under torchrun --standalone)")
    ap.add_argument("--workers", type=int, default=1, help="data.workers per rank")
    ap.add_argument("--dir", default=str(ROOT / ".bench" / "startup"), help="where the shards and runs are kept")
    ap.add_argument("--target", type=float, default=15.0, help="seconds above the baseline launch")
    args = ap.parse_args()

    base = Path(args.dir)
    t = time.perf_counter()
    real = make_real_shards(base / "real")
    big = make_shard_folder(base / f"many-{args.shards}", real, args.shards, "laion")
    small = make_shard_folder(base / f"few-{BASELINE_SHARDS}", real, BASELINE_SHARDS, "laion")
    print(
        f"{args.shards:,} shard files (hard links to {len(real)} real tars of {PER_SHARD} samples) and a "
        f"manifest; baseline {BASELINE_SHARDS} shards  (ready in {time.perf_counter() - t:.1f} s, not counted)"
    )
    print(
        f"clipscale train: clip-tiny fp32 on CPU, batch 16, {args.ranks} rank(s) x {args.workers} worker(s); "
        f"launch -> first step line in metrics.jsonl"
    )
    results = {}
    for label, pattern in (("few", small), ("many", big)):
        runs = [
            launch(pattern, base / f"run-{label}-{args.ranks}", args.ranks, args.workers) for _ in range(args.repeats)
        ]
        best = min(runs, key=lambda r: r["first_step"])
        results[label] = best
        tries = ", ".join(f"{r['first_step']:.2f}" for r in runs)
        n = BASELINE_SHARDS if label == "few" else args.shards
        split = (
            f"   (trainer's log: model {best['model']:.2f} s, data {best['data']:.2f} s, first batch wait "
            f"{best['wait']:.2f} s; {best['total']:.2f} s from its start to the end of step 1)"
            if "total" in best
            else ""
        )
        print(f"  {n:>7,} shards: first step {best['first_step']:.2f} s after launch (of {tries}){split}")
    extra = results["many"]["first_step"] - results["few"]["first_step"]
    ok = extra < args.target
    print(
        f"start-up with {args.shards:,} shards: {results['many']['first_step']:.2f} s; with {BASELINE_SHARDS} shards "
        f"(imports, model build, first step): {results['few']['first_step']:.2f} s; "
        f"difference {extra:.2f} s   [target < {args.target:g} s]"
    )
    if "model" in results["many"]:
        print(
            f"model build (trainer's log): {results['many']['model']:.2f} s; data set-up with "
            f"{args.shards:,} shards: {results['many']['data']:.2f} s (with {BASELINE_SHARDS}: "
            f"{results['few']['data']:.2f} s)"
        )
    print("within the target" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
