"""Preemption while the main thread is stuck in C (issue 29, item 5): rank 1 frozen, rank 0 waits in
a collective, SIGUSR1 to both; rank 0 takes the signal in a thread, leaves its stacks, says
preempted and exits with the code SLURM requeues. A real 2-rank job, real signals."""

import json
import signal

import psutil
import pytest

from clipscale.job.preempt import EXIT_PREEMPTED
from clipscale.metrics import read_jsonl

from process_helpers import logged_steps, run, start, wait_for


@pytest.mark.slow
def test_a_signal_reaches_a_rank_stuck_in_a_collective(tmp_path, toy_shards):
    run_dir = tmp_path / "run"
    settings = ["checkpoint.every_n_steps=2", "data.workers=0", "train.preempt_grace_s=2"]
    job = start(2, run_dir, toy_shards, "train.steps=100000", *settings)
    try:
        wait_for(lambda: logged_steps(run_dir) >= 4, job)
        rank0, rank1 = sorted(psutil.Process(job.pid).children(), key=lambda p: p.pid)  # forked in rank order
        rank1.send_signal(signal.SIGSTOP)  # frozen: rank 0 soon waits for it in the gradient all-reduce
        wait_for(lambda: _waiting(rank0), job, timeout=60)
        job.send_signal(signal.SIGUSR1)  # the launcher passes it to both ranks, as SLURM signals every task
        output = job.communicate(timeout=120)[0]
    finally:
        if job.poll() is None:
            for p in psutil.Process(job.pid).children(recursive=True):
                p.kill()
            job.kill()
    assert job.returncode == EXIT_PREEMPTED, output[-3000:]
    # 2 s in a step; 8 s when the frozen rank caught rank 0 in a checkpoint's barrier
    assert "SIGUSR1 not taken within" in output and "the main thread is stuck in C" in output, output[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and status["signal"] == "SIGUSR1" and status["checkpointed"] is False
    (stacks,) = (run_dir / "hang").glob("preempted-rank0-*.txt")
    assert stacks.read_text().count("(most recent call first)") >= 2  # every thread's stack, the main one's too
    # the requeued job resumes from the last checkpoint and goes on
    stopped = logged_steps(run_dir)
    run(2, run_dir, toy_shards, f"train.steps={stopped + 2}", "checkpoint.resume=auto", *settings)
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["step"] == stopped + 2


def _waiting(process) -> bool:
    """The process spends no CPU for a moment: its main thread waits (in C) for the frozen rank."""
    import time

    before = sum(process.cpu_times()[:2])
    time.sleep(0.5)
    return sum(process.cpu_times()[:2]) - before < 0.05
