"""`python -m clipscale.launch`: torchrun, ending in one clear line (no traceback) when the run
stopped the way it was meant to: signalled (preempted) or stopped by the hang watchdog."""

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from clipscale.job.preempt import EXIT_PREEMPTED
from clipscale.job.watchdog import EXIT_HUNG

WORKER = textwrap.dedent("""
    import signal, sys, time
    mode, ready = sys.argv[1], sys.argv[2]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit({preempted}))  # checkpointed and stopped
    open(ready, "w").close()
    if mode == "hang":
        sys.exit({hung})  # what the watchdog does
    if mode == "error":
        print("clipscale: error: cannot write checkpoint step_00000002.pt: OSError: disk full", file=sys.stderr)
        sys.exit(2)  # a UserError's one line and code
    time.sleep(120)
""").format(preempted=EXIT_PREEMPTED, hung=EXIT_HUNG)


def launch(tmp_path, mode, signals=("--signals-to-handle=SIGTERM,SIGUSR1",)):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    ready = tmp_path / "ready"
    cmd = [
        sys.executable,
        "-m",
        "clipscale.launch",
        "--standalone",
        "--nproc_per_node=1",
        *signals,
        str(script),
        mode,
        str(ready),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, ready


@pytest.mark.parametrize(
    "sig, signals",
    [(signal.SIGTERM, ("--signals-to-handle=SIGTERM,SIGUSR1",)), (signal.SIGUSR1, ())],
    ids=["SIGTERM", "SIGUSR1-by-default"],
)
def test_a_signalled_launch_ends_in_one_line_with_the_shell_code(tmp_path, sig, signals):
    """SIGUSR1 (SLURM's usual warning signal) is handled without --signals-to-handle: its default
    action would kill torchrun and orphan the ranks while they checkpoint."""
    proc, ready = launch(tmp_path, "wait", signals)
    deadline = time.time() + 120
    while not ready.exists():
        if proc.poll() is not None or time.time() > deadline:  # say why: the launch's own output
            proc.kill()
            raise AssertionError(f"the worker never started (code {proc.poll()}):\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.05)
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + sig, out
    assert f"clipscale launch: stopped by {sig.name}" in out and "Traceback" not in out, out


def test_a_hung_worker_ends_the_launch_with_its_code_in_one_line(tmp_path):
    proc, _ = launch(tmp_path, "hang")
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_HUNG, out
    assert f"clipscale launch: worker rank 0 exited with code {EXIT_HUNG} (hung" in out and "Traceback" not in out


def test_a_worker_that_stopped_with_its_one_line_error_ends_the_launch_without_a_traceback(tmp_path):
    proc, _ = launch(tmp_path, "error")
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2, out
    assert "clipscale: error: cannot write checkpoint" in out
    assert "clipscale launch: worker rank 0 exited with code 2 (stopped with an error" in out and "Traceback" not in out
