"""A rank that fails while the others wait for it stops every rank within seconds with the same one
line (issue 29, item 4): job/failfast.py with real processes (gloo, CPU)."""

import json
import subprocess
import sys
import textwrap
import time

import pytest

from process_helpers import ENV, LAUNCHER, run, with_faults

ONE_FAILS = textwrap.dedent("""
    import datetime, sys, time
    import torch, torch.distributed as dist
    from clipscale.job.distributed import init_distributed
    from clipscale.job.failfast import FailFast
    env = init_distributed("cpu", 600)  # a collective waits 10 minutes before it times out
    fail_fast = FailFast(env.rank, env.world_size, sys.argv[1])
    if env.rank == 1:
        fail_fast.announce(2, "checkpoint.resume: cannot load step_00000004.pt: damaged")
        time.sleep(60)  # a failing rank that does not leave (stuck in its own clean-up)
    dist.broadcast(torch.zeros(1), src=1)  # rank 0: waits for rank 1, which never sends
    print("rank 0 got past the broadcast", flush=True)
""")


def test_the_others_stop_with_the_failing_ranks_line_and_code(tmp_path):
    script = tmp_path / "one_fails.py"
    script.write_text(ONE_FAILS)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(LAUNCHER), "2", str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    took = time.monotonic() - started
    # rank 0 stopped at once with rank 1's line and code; the launcher then ended rank 1 (its 10 s grace)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "clipscale: error: checkpoint.resume: cannot load step_00000004.pt: damaged" in proc.stderr
    assert "got past" not in proc.stdout and "Traceback" not in proc.stderr
    assert took < 40, took
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and status["error"].startswith("rank 1: checkpoint.resume")


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault",
    [
        {"name": ".step_00000002.pt.tmp", "from": 1, "error": "ENOSPC"},  # the file cannot be made
        {"glob": ".step_00000002.pt.tmp", "write_budget": 100_000, "error": "ENOSPC"},  # the disk fills mid-write
    ],
    ids=["at-open", "mid-write"],
)
def test_a_save_that_fails_on_one_rank_ends_every_rank_with_its_line(tmp_path, toy_shards, fault):
    """Rank 0 writes the file: its full disk ends both ranks with one line. Mid-write, torch.save's zip
    writer turns the write's OSError into a RuntimeError on its way out: still the same line, and the
    partial file is removed (on a full disk its space is what is missing)."""
    full_disk = with_faults(fault)
    started = time.monotonic()
    proc = run(2, tmp_path / "run", toy_shards, "train.steps=4", "data.workers=0", expect=2, env=full_disk)
    assert time.monotonic() - started < 60
    errors = [line for line in proc.stderr.splitlines() if line.startswith("clipscale: error:")]
    assert len(errors) == 2 and len(set(errors)) == 1, proc.stderr[-3000:]  # both ranks, the same line
    assert "cannot write checkpoint step_00000002.pt: OSError: [Errno 28]" in errors[0]
    assert "Traceback" not in proc.stderr
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and "No space left on device" in status["error"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".step_00000002.pt.tmp*"))
