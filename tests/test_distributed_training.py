"""Real 2-process torchrun training (gloo on CPU) against a 1-process run with the same global batch."""

import os
import subprocess
import sys

import pytest

from clipscale.metrics import read_jsonl

COMMON = [
    "model.name=clip-tiny",
    "model.precision=fp32",
    "train.device=cpu",
    "train.steps=6",
    "logging.every_n_steps=1",
    "logging.progress=false",
    "data.batch_size=8",
    "schedule.warmup_steps=2",
    "optim.lr=1e-3",
    "data.shuffle_buffer=32",
    "checkpoint.every_n_steps=1000",
]


def torchrun(nproc, run_dir, shards, *overrides, extra_args=()):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *extra_args,
        "-m",
        "clipscale.train",
        f"run.dir={run_dir}",
        f"data.train_shards={shards}",
        *COMMON,
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl")}


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["local", "chunked"])
def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path, toy_shards, impl):
    # Same global batch of 16 either way: 2 ranks x 8 (one stream each), or 1 process that
    # accumulates 2 x 8 from its 2 worker streams (the feature cache makes that the same loss).
    two = torchrun(2, tmp_path / "two", toy_shards, "data.workers=1", f"loss.impl={impl}")
    one = torchrun(1, tmp_path / "one", toy_shards, "data.workers=2", "optim.accum_steps=2", f"loss.impl={impl}")
    assert sorted(two) == sorted(one) == list(range(1, 7))
    for step in range(1, 7):
        assert two[step]["global_batch"] == one[step]["global_batch"] == 16
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], abs=1e-4), step
    assert 0 <= two[6]["gather_frac"] < 1
