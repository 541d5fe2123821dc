"""`clipscale supervise`: the batch-shell side of a SLURM job, with real processes and signals.

The training step is a small stand-in that writes status.json the way the trainer does; `scontrol`
is a stand-in on PATH that records its arguments. The real thing runs in test_slurm.py.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from clipscale.errors import EXIT_UNREADABLE
from clipscale.job.preempt import EXIT_PREEMPTED
from clipscale.job.status import read_status, write_status
from clipscale.job.supervise import should_requeue, slurm_job_key
from clipscale.job.watchdog import EXIT_HUNG

STEP = textwrap.dedent("""
    import signal, sys, time
    from clipscale.job.status import write_status
    run_dir, mode = sys.argv[1], sys.argv[2]
    def stop(signum, frame):
        if mode != "die_silently":
            write_status(run_dir, "preempted", step=7, signal=signal.Signals(signum).name)
        sys.exit(75)
    for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        signal.signal(s, stop)
    if mode == "finish":
        write_status(run_dir, "finished", step=12)
        sys.exit(0)
    if mode == "crash":
        sys.exit(3)
    if mode.startswith("hung_at_"):  # what the hang watchdog leaves
        write_status(run_dir, "hung", step=int(mode[8:]), hung_ranks_reported=[0])
        sys.exit(76)
    if mode.startswith("unreadable_at_"):  # a checkpoint the storage failed to read (not damage)
        write_status(run_dir, "unreadable", step=int(mode[14:]), error="cannot read step_4.pt: EIO")
        sys.exit(74)
    write_status(run_dir, "running", step=1)
    open(run_dir + "/ready", "w").close()
    time.sleep(60)
""")


@pytest.fixture
def job(tmp_path):
    """(run(mode, signal=None, env=...) -> (returncode, output), path of the requeue log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    requeued = tmp_path / "requeued.txt"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {requeued}\nexit ${{FAKE_SCONTROL_RC:-0}}\n')
    scontrol.chmod(0o755)
    step = tmp_path / "step.py"
    step.write_text(STEP)
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def run(mode, send=None, **env):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        full_env.update({"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", **env})
        full_env = {k: v for k, v in full_env.items() if v is not None}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clipscale",
                "supervise",
                "--run-dir",
                str(run_dir),
                "--",
                sys.executable,
                str(step),
                str(run_dir),
                mode,
            ],
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if send is not None:
            deadline = time.time() + 60
            while not (run_dir / "ready").exists():
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
                time.sleep(0.05)
            proc.send_signal(send)
        out = proc.communicate(timeout=60)[0]
        (run_dir / "ready").unlink(missing_ok=True)
        return proc.returncode, out

    run.run_dir = run_dir
    return run, requeued


def test_finished_run_is_not_requeued(job):
    run, requeued = job
    code, out = run("finish")
    assert code == 0 and not requeued.exists()
    assert "run state: finished at step 12" in out


def test_usr1_is_forwarded_and_the_job_requeues_itself(job):
    run, requeued = job
    code, out = run("wait", send=signal.SIGUSR1, SLURM_RESTART_COUNT="2")
    assert code == 0, out
    assert requeued.read_text().split() == ["requeue", "77"]
    assert read_status(run.run_dir)["signal"] == "SIGUSR1"  # the step got the signal, not a kill
    assert "[job 77 requeue2]" in out and "requeueing job 77" in out


def test_array_task_requeues_by_array_id(job):
    run, requeued = job
    code, out = run("wait", send=signal.SIGUSR2, SLURM_ARRAY_JOB_ID="70", SLURM_ARRAY_TASK_ID="3")
    assert code == 0, out
    assert requeued.read_text().split() == ["requeue", "70_3"]


def test_sigterm_checkpoints_but_does_not_requeue(job):
    """scancel (or SLURM's own preemption, which requeues by itself) sends SIGTERM."""
    run, requeued = job
    code, out = run("wait", send=signal.SIGTERM)
    assert code == EXIT_PREEMPTED and not requeued.exists(), out
    assert read_status(run.run_dir)["state"] == "preempted"


def test_signal_caught_but_step_died_without_status_still_requeues(job):
    run, requeued = job
    code, out = run("die_silently", send=signal.SIGUSR1)
    assert code == 0 and requeued.read_text().split() == ["requeue", "77"], out


def test_stale_status_from_an_earlier_attempt_is_ignored(job):
    run, requeued = job
    write_status(run.run_dir, "preempted", step=5, signal="SIGUSR1")
    time.sleep(0.01)
    code, out = run("crash")
    assert code == 3 and not requeued.exists(), out
    assert "no fresh status.json" in out


def test_failed_requeue_and_non_slurm_runs_say_so(job):
    run, requeued = job
    code, out = run("wait", send=signal.SIGUSR1, FAKE_SCONTROL_RC="1")
    assert code == EXIT_PREEMPTED and "failed" in out and "resubmit" in out
    code, out = run("wait", send=signal.SIGUSR1, SLURM_JOB_ID=None)
    assert code == EXIT_PREEMPTED and "not requeued" in out


def test_a_hung_run_is_requeued_a_bounded_number_of_times_in_a_row(job):
    """Three hangs at step 7 are requeued; the fourth without getting past step 7 fails the job; a
    hang after progress (step 9) starts the count again."""
    run, requeued = job
    for attempt in range(1, 4):
        code, out = run("hung_at_7")
        assert code == 0 and requeued.read_text().split() == ["requeue", "77"] * attempt, out
        assert f"hang {attempt} in a row" in out and "hung at step 7: requeueing job 77" in out
    code, out = run("hung_at_7")
    assert code == EXIT_HUNG and len(requeued.read_text().split()) == 6, out
    assert "hung 4 times in a row without getting past step 7: not requeued" in out
    code, out = run("hung_at_9")
    assert code == 0 and len(requeued.read_text().split()) == 8 and "hang 1 in a row" in out, out
    code, out = run("hung_at_9", SLURM_JOB_ID=None)
    assert code == EXIT_HUNG and "not requeued" in out


def test_a_run_that_cannot_read_its_checkpoint_is_requeued_a_bounded_number_of_times(job):
    """An I/O error reading the checkpoint is the storage's, not the run's: requeued (the checkpoint is
    tried again), but not forever when it never gets past that step."""
    run, requeued = job
    for attempt in range(1, 4):
        code, out = run("unreadable_at_4")
        assert code == 0 and requeued.read_text().split() == ["requeue", "77"] * attempt, out
        assert f"a checkpoint could not be read ({attempt} in a row" in out and "unreadable at step 4: requeue" in out
    code, out = run("unreadable_at_4")
    assert code == EXIT_UNREADABLE and len(requeued.read_text().split()) == 6, out
    assert "could not read its checkpoint 4 times in a row without getting past step 4: not requeued" in out
    assert "cannot read step_4.pt: EIO" in out


def test_supervise_without_a_command_is_a_one_line_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "clipscale", "supervise", "--run-dir", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.startswith("clipscale: error: supervise needs")
    assert "Traceback" not in proc.stderr


def test_requeue_decision_table():
    usr = ("SIGUSR1", "SIGUSR2")
    assert should_requeue({"state": "preempted", "signal": "SIGUSR1"}, None, usr)
    assert not should_requeue({"state": "preempted", "signal": "SIGTERM"}, None, usr)
    assert not should_requeue({"state": "finished"}, "SIGUSR1", usr)
    assert not should_requeue({"state": "failed"}, "SIGUSR1", usr)
    assert should_requeue({"state": "hung", "step": 3}, None, usr)
    assert should_requeue({"state": "unreadable", "step": 3}, None, usr)
    assert should_requeue({"state": "running"}, "SIGUSR1", usr)
    assert should_requeue(None, "SIGUSR2", usr)
    assert not should_requeue(None, None, usr)
    assert slurm_job_key({"SLURM_JOB_ID": "9"}) == "9"
    assert slurm_job_key({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "8", "SLURM_ARRAY_TASK_ID": "1"}) == "8_1"
    assert slurm_job_key({}) is None


def test_status_command_prints_the_record_or_one_field(tmp_path):
    write_status(tmp_path, "preempted", step=7, signal="SIGUSR1")
    cmd = [sys.executable, "-m", "clipscale", "status", str(tmp_path)]
    assert subprocess.run([*cmd, "--field", "state"], capture_output=True, text=True).stdout == "preempted\n"
    assert '"step": 7' in subprocess.run(cmd, capture_output=True, text=True).stdout
    missing = subprocess.run([*cmd[:-1], str(tmp_path / "nope")], capture_output=True, text=True)
    assert (
        missing.returncode == 2 and missing.stderr.startswith("clipscale: error:") and "status.json" in missing.stderr
    )
