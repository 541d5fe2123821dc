"""clipscale against OpenCLIP's own trainer on the same job, measured side by side.

Same shards, model config, per-rank batch (so the same global batch), process count, steps,
precision, DataLoader workers, optimizer settings, LR schedule and loss (OpenCLIP with
`--local-loss --gather-with-grad`, the setting that scales; clipscale's `loss.impl=local` is the
same computation). Runs alternate A B A B ... on the same CPU so drifts in the machine's speed
hit both. Figure: samples/s of each step as each trainer reports it (wall time from the end of
one step to the end of the next, data wait included), median over the steps after warm-up;
the ratio is clipscale's median over OpenCLIP's.

OpenCLIP's trainer 3.3.0 needs webdataset 0.2.x (1.x yields an end-of-shard `{}` that it reads
as a sample: KeyError 'fname'), so it runs in its own venv (`--ref-venv`, created on first use):
webdataset==0.2.86 and pandas installed there, everything else (the same torch and
open_clip_torch wheels) seen through a .pth link to this interpreter's site-packages, so both
trainers run identical library code. It is launched through benchmarks/openclip_cpu.py, which
only makes its DDP accept CPU modules and registers our model configs.

On a GPU (`--device cuda --precision bf16`, as `make gpu-check` runs it, one process per GPU):
OpenCLIP's `--precision amp_bf16`, clipscale's model.precision=bf16 and its defaults there (torch.compile
on). Offline, `--ref-path DIR` replaces the reference venv: DIR holds webdataset 0.2.86 (installed from
wheels) and goes first on OpenCLIP's PYTHONPATH.

    make bench    # from a clean clone: installs .venv, then runs this script with it
    .venv/bin/python benchmarks/vs_openclip.py [--steps 60 --warmup 15 --rounds 2 --batch-size 64 --workers 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import yaml
from bench_data import build_shards, make_images, shard_pattern

ROOT = Path(__file__).resolve().parents[1]
REF_PACKAGES = ["webdataset==0.2.86", "pandas", "pytz"]
OPENCLIP_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+.*?Batch \(t\): [\d.]+, ([\d.]+)/s.*?\bLoss: ([\d.]+)")


# --------------------------------------------------------------------------- the reference venv


def ref_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ref_venv_ok(venv: Path) -> bool:
    if not ref_python(venv).is_file():
        return False
    probe = "import webdataset, open_clip_train.main, torch; print(webdataset.__version__)"
    proc = subprocess.run([str(ref_python(venv)), "-c", probe], capture_output=True, text=True)
    return proc.returncode == 0 and proc.stdout.strip().startswith("0.2.")


def ensure_ref_venv(venv: Path) -> None:
    """A venv where `import webdataset` is 0.2.86 and everything else is this environment's."""
    if ref_venv_ok(venv):
        return
    print(f"creating the reference venv {venv} (webdataset==0.2.86 for open_clip_train) ...", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(ref_python(venv)), "-m", "pip", "install", "-q", "--no-deps", *REF_PACKAGES], check=True)
    except subprocess.CalledProcessError as exn:
        raise SystemExit(
            f"could not create the reference venv {venv} ({' '.join(map(str, exn.cmd[:4]))} ... "
            f"exited {exn.returncode}); is PyPI reachable?"
        ) from None
    site = subprocess.run(
        [str(ref_python(venv)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # .pth lines are appended to sys.path after the venv's own site-packages: its webdataset wins
    Path(site, "zz_clipscale_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    if not ref_venv_ok(venv):
        raise SystemExit(f"the reference venv {venv} does not import open_clip_train with webdataset 0.2.x")


# --------------------------------------------------------------------------- the two runs


def torchrun(python: Path, nproc: int) -> list[str]:
    return [str(python), "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def run_logged(cmd: list[str], log: Path, cwd: Path, env: dict | None = None) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{cmd[0]} ... failed (exit {proc.returncode}); last lines of {log}:\n{tail}")


def run_openclip(args, pattern: str, out: Path, venv: Path) -> list[tuple[int, float, float]]:
    """[(step, samples/s, loss)] from open_clip_train's per-step log lines."""
    global_batch = args.batch_size * args.nproc
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = None
    if args.ref_path:  # offline: webdataset 0.2.x from this folder, first on the path
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [args.ref_path, os.environ.get("PYTHONPATH")]))}
    python = Path(sys.executable) if args.ref_path else ref_python(venv)
    cmd = [
        *torchrun(python, args.nproc),
        str(ROOT / "benchmarks" / "openclip_cpu.py"),
        "--train-data",
        pattern,
        "--dataset-type",
        "webdataset",
        "--train-num-samples",
        str(args.steps * global_batch),
        "--epochs",
        "1",
        "--model",
        args.model,
        "--precision",
        "amp_bf16" if args.precision == "bf16" else "fp32",
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--lr",
        str(args.lr),
        "--wd",
        "0.1",
        "--warmup",
        str(args.lr_warmup),
        "--beta1",
        "0.9",
        "--beta2",
        "0.98",
        "--eps",
        "1e-6",
        "--grad-clip-norm",
        "1.0",
        "--local-loss",
        "--gather-with-grad",
        "--seed",
        "0",
        "--log-every-n-steps",
        "1",
        "--name",
        "run",
        "--save-frequency",
        "0",
        "--zeroshot-frequency",
        "0",
        "--val-frequency",
        "0",
        "--report-to",
        "",
    ]
    log = out / "console.log"
    # its logs go to ./logs/ (torchrun's own parser takes `--logs` for an abbreviation of --logs-specs)
    run_logged(cmd, log, out, env)
    rows = [(int(m[1]) // global_batch, float(m[2]), float(m[3])) for m in OPENCLIP_LINE.finditer(log.read_text())]
    if len(rows) < args.steps:
        raise SystemExit(f"open_clip_train logged {len(rows)} of {args.steps} steps; see {log}")
    return rows


def run_clipscale(args, pattern: str, out: Path) -> list[tuple[int, float, float]]:
    """[(step, samples/s, loss)] from clipscale's metrics.jsonl (logged every step)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = {
        "seed": 0,
        "run": {"dir": str(out)},
        "model": {"name": args.model, "precision": args.precision},
        "data": {"train_shards": pattern, "batch_size": args.batch_size, "workers": args.workers},
        "optim": {"lr": args.lr, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6, "grad_clip_norm": 1.0},
        "schedule": {"name": "cosine", "warmup_steps": args.lr_warmup},
        "loss": {"name": "clip", "impl": "local"},
        "train": {"steps": args.steps, "device": args.device},
        "checkpoint": {"every_n_steps": 10**9, "save_final": False},
        "logging": {"every_n_steps": 1, "progress": False},
    }
    cfg_path = out / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    python = Path(sys.executable)
    cmd = [*torchrun(python, args.nproc), "-m", "clipscale", "train", "--config", str(cfg_path), *args.clipscale_set]
    run_logged(cmd, out / "console.log", ROOT)
    rows = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "samples_per_s" in rec:
            rows.append((int(rec["step"]), float(rec["samples_per_s"]), float(rec["loss"])))
    return rows


def measured(rows: list[tuple[int, float, float]], warmup: int) -> float:
    return statistics.median(r[1] for r in rows if r[0] > warmup)


def loss_at(rows: list[tuple[int, float, float]], steps: list[int]) -> list[float]:
    """Mean loss over the 5 steps ending at each of `steps` (both trainers log every step)."""
    out = []
    for s in steps:
        window = [r[2] for r in rows if s - 5 < r[0] <= s]
        out.append(sum(window) / len(window) if window else float("nan"))
    return out


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=15, help="steps left out of the median (start-up, buffers)")
    ap.add_argument("--rounds", type=int, default=2, help="A B pairs")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64, help="per process")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers per process")
    ap.add_argument("--model", default="clip-tiny")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-warmup", type=int, default=10)
    ap.add_argument("--width", type=int, default=320, help="JPEG width in the shards")
    ap.add_argument("--height", type=int, default=256, help="JPEG height in the shards")
    ap.add_argument("--per-shard", type=int, default=128)
    ap.add_argument("--workdir", default=str(ROOT / ".bench" / "vs_openclip"))
    ap.add_argument("--ref-venv", default=str(ROOT / ".ref-venv"))
    ap.add_argument(
        "--clipscale-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra clipscale override, e.g. data.jpeg_draft=false (ablations)",
    )
    ap.add_argument("--only", choices=["clipscale", "openclip"], help="run one side (for profiling)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--ref-path", help="offline: a folder with webdataset 0.2.x for OpenCLIP, instead of --ref-venv")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()

    work, venv = Path(args.workdir).resolve(), Path(args.ref_venv).resolve()
    global_batch = args.batch_size * args.nproc
    # every rank's share of the shards must hold a whole epoch of OpenCLIP's run (it stops a rank
    # whose shards run out): an even number of full shards, one spare pair
    per_rank = args.steps * args.batch_size
    shards_per_rank = -(-per_rank // args.per_shard) + 1
    n = shards_per_rank * args.nproc * args.per_shard
    data = work / f"data-{args.width}x{args.height}-{n}"
    table = make_images(data / "images", n, (args.width, args.height), tinted=True)
    shards = build_shards(table, data / "shards", args.per_shard)
    pattern = shard_pattern(shards)
    if args.only != "clipscale" and not args.ref_path:
        ensure_ref_venv(venv)

    print(
        f"job: {args.model}, {args.nproc} processes x batch {args.batch_size} = global batch {global_batch}, "
        f"{args.workers} worker(s) per process, {args.device} {args.precision}, {args.steps} steps "
        f"(median over steps > {args.warmup}); "
        f"{len(shards)} shards of {args.per_shard} JPEGs {args.width}x{args.height}; "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    results: dict[str, list[float]] = {"clipscale": [], "openclip": []}
    last: dict[str, list] = {}
    for r in range(args.rounds):
        for name in ("clipscale", "openclip"):
            if args.only and name != args.only:
                continue
            t0 = time.perf_counter()
            if name == "clipscale":
                rows = run_clipscale(args, pattern, work / f"run-clipscale-{r}")
            else:
                rows = run_openclip(args, pattern, work / f"run-openclip-{r}", venv)
            rate = measured(rows, args.warmup)
            results[name].append(rate)
            last[name] = rows
            print(
                f"round {r + 1} {name:9s}: {rate:7.1f} samples/s  (run took {time.perf_counter() - t0:.0f} s)",
                flush=True,
            )

    marks = [s for s in (5, args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps) if s >= 5]
    print("\nloss (mean of the 5 steps ending at step):  " + "  ".join(f"{s:>6d}" for s in marks))
    for name, rows in last.items():
        print(f"  {name:9s}" + " " * 32 + "  ".join(f"{v:6.3f}" for v in loss_at(rows, marks)))
    medians = {k: statistics.median(v) for k, v in results.items() if v}
    for name, value in medians.items():
        runs = ", ".join(f"{v:.1f}" for v in results[name])
        print(f"{name:9s}: {value:7.1f} samples/s (median of runs: {runs})")
    ratio = medians["clipscale"] / medians["openclip"] if len(medians) == 2 else None
    if ratio is not None:
        print(f"ratio clipscale / OpenCLIP: {ratio:.2f}x")
    if args.json:
        figures = {"model": args.model, "batch_size": args.batch_size, "nproc": args.nproc, "steps": args.steps,
                   "device": args.device, "precision": args.precision, "samples_per_s": medians, "runs": results,
                   "ratio": ratio}  # fmt: skip
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
