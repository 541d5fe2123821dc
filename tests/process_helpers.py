"""Run clipscale training jobs as real processes (python -m clipscale.train, or torchrun)."""

import os
import random
import subprocess
import sys
import time
from pathlib import Path

from clipscale.metrics import read_jsonl, read_sample_keys

STEPS = 12
COMMON = [
    "model.name=clip-tiny",
    "model.precision=fp32",
    "train.device=cpu",
    f"train.steps={STEPS}",
    "logging.every_n_steps=1",
    "logging.progress=false",
    "logging.sample_keys=true",
    "data.batch_size=4",
    "data.workers=2",
    "data.shuffle=true",
    "data.shuffle_buffer=16",
    "schedule.warmup_steps=2",
    "optim.lr=1e-3",
    "checkpoint.every_n_steps=2",
    "checkpoint.keep_last=0",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


LAUNCHER = Path(__file__).parent / "rank_launcher.py"


def command(nproc, run_dir, shards, *overrides, torchrun_args=(), torchrun=False):
    """The command of a training job: one process, or `nproc` ranks started by rank_launcher.py (torchrun's
    variables without its start-up cost) or, with `torchrun` or `torchrun_args`, by clipscale.launch."""
    shard_args = [f"data.train_shards={shards}"] if shards else []  # None: the overrides name data.sources
    args = ["-m", "clipscale.train", f"run.dir={run_dir}", *shard_args, *COMMON, *overrides]
    if nproc == 1 and not (torchrun_args or torchrun):
        return [sys.executable, *args]
    if not (torchrun_args or torchrun):
        return [sys.executable, str(LAUNCHER), str(nproc), *args]
    return [
        sys.executable,
        "-m",
        "clipscale.launch",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *torchrun_args,
        *args,
    ]


FAULTS = Path(__file__).parent / "faults"


def with_faults(*rules) -> dict:
    """The environment of a job whose file opens fail as `rules` say (tests/faults/sitecustomize.py)."""
    import json

    path = os.pathsep.join(filter(None, [str(FAULTS), ENV.get("PYTHONPATH")]))
    return {**ENV, "PYTHONPATH": path, "CLIPSCALE_FAULTS": json.dumps(list(rules))}


def run(nproc, run_dir, shards, *overrides, expect=0, torchrun_args=(), torchrun=False, env=None):
    proc = subprocess.run(
        command(nproc, run_dir, shards, *overrides, torchrun_args=torchrun_args, torchrun=torchrun),
        capture_output=True,
        text=True,
        timeout=600,
        env=env or ENV,
    )
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc


def start(nproc, run_dir, shards, *overrides, torchrun_args=(), torchrun=False):
    return subprocess.Popen(
        command(nproc, run_dir, shards, *overrides, torchrun_args=torchrun_args, torchrun=torchrun),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        start_new_session=True,
    )


def wait_for(predicate, proc=None, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def kill_tree(proc) -> None:
    """SIGKILL a launcher and every process under it, as a node failure would. (torchrun starts each
    worker in a session of its own: killing torchrun's process group leaves the workers training.)"""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(procs, timeout=30)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return max((r["step"] for r in read_jsonl(path)), default=0) if path.is_file() else 0


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}


# The loss curve every engine is compared on against DDP (tests/test_fsdp2.py, tests/test_deepspeed.py;
# DDP's own curves are the session fixture `ddp_curves` in conftest.py). Checkpoints every 2 steps and
# the sample keys make the same run the uninterrupted reference of a kill-and-resume test.
CURVE_STEPS = 20
CURVE = [
    f"train.steps={CURVE_STEPS}",
    "checkpoint.every_n_steps=2",
    "logging.sample_keys=true",
    "data.batch_size=8",
    "data.workers=1",
]
CURVE_ACCUM = ["optim.accum_steps=2", "model.grad_checkpointing=true"]


def keys(run_dir):
    return {(r["step"], r["rank"]): r["keys"] for r in read_sample_keys(run_dir)}


def setting(key: str, overrides) -> int:
    """The value of an integer setting in COMMON + overrides (the last one wins, as in the config)."""
    values = [item.split("=", 1)[1] for item in (*COMMON, *overrides) if item.startswith(f"{key}=")]
    return int(values[-1])


def kill_and_resume(nproc, tmp_path, shards, *overrides, seed=0, full=None):
    """SIGKILL a run at a random step, resume it with resume=auto, and check that every step's
    loss (bitwise) and sample keys equal those of the same run never interrupted (`full`: that run,
    made already by another test with the same settings; else it is made here)."""
    steps, batch = setting("train.steps", overrides), setting("data.batch_size", overrides)
    every = setting("checkpoint.every_n_steps", overrides)
    part = tmp_path / "part"
    if full is None:
        full = tmp_path / "full"
        run(nproc, full, shards, *overrides)
    kill_at = random.Random(seed).randrange(3, steps - 2)
    proc = start(nproc, part, shards, *overrides)
    wait_for(lambda: logged_steps(part) >= kill_at, proc)
    kill_tree(proc)
    killed_at = logged_steps(part)
    assert killed_at < steps
    run(nproc, part, shards, "checkpoint.resume=auto", *overrides)
    a, b = losses(full), losses(part)
    assert sorted(b) == list(range(1, steps + 1))
    assert [a[s] for s in range(1, steps + 1)] == [b[s] for s in range(1, steps + 1)]  # bitwise
    ka, kb = keys(full), keys(part)
    assert ka == kb and len(ka) == steps * nproc
    resumed_from = max(s for s in range(0, killed_at + 1, every))
    assert all(len(kb[(s, r)]) == batch for s in range(resumed_from + 1, steps + 1) for r in range(nproc))
    return full, part
