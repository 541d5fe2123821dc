"""One job owns a run folder (issue 29, item 7): the lease (job/lease.py) with real processes, and
a rank that stops when its launcher is killed."""

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from clipscale.job.lease import LEASE_FILE, RunFolderInUse, RunLease
from clipscale.metrics import read_jsonl

from process_helpers import logged_steps, run, start, wait_for


def write_lease(folder, **fields):
    record = {"host": socket.gethostname(), "pid": os.getpid(), "token": "t0", "beat": 0, "heartbeat": time.time()}
    record.update(fields)
    (folder / LEASE_FILE).write_text(json.dumps(record))
    return record


@pytest.fixture
def other_process():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


HOLDER = """
import sys, time
from clipscale.job.lease import RunLease
lease = RunLease(sys.argv[1], heartbeat_s=0.1)
lease.acquire()
print("holding", flush=True)
time.sleep(60)
"""


def test_a_live_owner_keeps_the_folder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "SLURM_JOB_ID": "4242"},
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(RunFolderInUse) as err:
            RunLease(tmp_path, stale_s=1.0).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert f"job 4242, host {socket.gethostname()}, pid {holder.pid}" in str(err.value)
    assert "\n" not in str(err.value)


def test_an_owner_whose_process_ended_is_taken_over_at_once(tmp_path, other_process):
    other_process.kill()
    other_process.wait()
    write_lease(tmp_path, pid=other_process.pid, heartbeat=time.time())
    lease = RunLease(tmp_path, stale_s=30)
    started = time.monotonic()
    assert "its process has ended" in lease.acquire()
    assert time.monotonic() - started < 5  # no waiting for a heartbeat on this host
    assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == lease.me["token"]
    lease.release()
    assert not (tmp_path / LEASE_FILE).exists()


def test_an_owner_elsewhere_is_gone_only_when_its_heartbeat_stops(tmp_path):
    record = write_lease(tmp_path, host="node-elsewhere", pid=1)
    stop = threading.Event()

    def beating():  # the owner on the other host, alive: its heartbeat moves
        while not stop.wait(0.1):
            record["beat"] += 1
            (tmp_path / LEASE_FILE).write_text(json.dumps(record))

    owner = threading.Thread(target=beating)
    owner.start()
    try:
        with pytest.raises(RunFolderInUse, match="host node-elsewhere, pid 1"):
            RunLease(tmp_path, stale_s=1.0).acquire()
    finally:
        stop.set()
        owner.join()
    lease = RunLease(tmp_path, stale_s=1.0)  # the heartbeat stopped: taken over after stale_s
    assert "no heartbeat for 1 s" in lease.acquire()
    lease.release()


def test_a_lease_taken_from_a_stuck_job_stops_it(tmp_path):
    lease = RunLease(tmp_path, heartbeat_s=0.05)
    lease.acquire()
    write_lease(tmp_path, host="node-elsewhere", token="theirs", job="99")  # taken over meanwhile
    deadline = time.time() + 10
    while lease.lost is None and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(RunFolderInUse, match="taken over by another job \\(job 99, host node-elsewhere"):
        lease.check()
    lease.release()
    assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == "theirs"  # not ours to remove


def _race(folder, results):
    try:
        lease = RunLease(folder, heartbeat_s=0.2, stale_s=5)
        lease.acquire()
        results.put("won")
        time.sleep(4)  # hold it (beating) while the others look: they find it alive
        lease.release()
    except RunFolderInUse:
        results.put("lost")


def test_jobs_taking_over_a_stale_lease_at_once_have_one_winner(tmp_path, other_process):
    other_process.kill()
    other_process.wait()
    write_lease(tmp_path, pid=other_process.pid)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(tmp_path, results)) for _ in range(4)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert outcomes == ["lost", "lost", "lost", "won"]


LONG = ["train.steps=100000", "checkpoint.every_n_steps=100000", "data.workers=0"]


@pytest.mark.slow
def test_a_second_job_is_refused_and_a_killed_launchers_ranks_stop(tmp_path, toy_shards):
    run_dir = tmp_path / "run"
    first = start(2, run_dir, toy_shards, *LONG)
    try:
        wait_for(lambda: logged_steps(run_dir) >= 2, first)
        owner = json.loads((run_dir / LEASE_FILE).read_text())
        second = run(2, run_dir, toy_shards, *LONG, expect=2)
        errors = {line for line in second.stderr.splitlines() if line.startswith("clipscale: error:")}
        assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"is in use by another job (host {owner['host']}, pid {owner['pid']}" in errors.pop()
        assert first.poll() is None and json.loads((run_dir / LEASE_FILE).read_text())["token"] == owner["token"]

        ranks = psutil.Process(first.pid).children()
        assert len(ranks) == 2
        first.send_signal(signal.SIGKILL)  # the launcher alone, as a node agent dying would
        first.wait()
        gone, alive = psutil.wait_procs(ranks, timeout=15)
        assert not alive, "the ranks trained on without their launcher"
        stopped_at = logged_steps(run_dir)
        time.sleep(1.5)
        assert logged_steps(run_dir) == stopped_at  # nothing written after they went
    finally:
        for p in psutil.Process(first.pid).children(recursive=True) if first.poll() is None else []:
            p.kill()
        first.kill()
    # the next job on the folder finds the owner gone (same host, pid dead) and takes over at once
    third = run(2, run_dir, toy_shards, "train.steps=3", "checkpoint.resume=none", "data.workers=0")
    assert (
        "took over the run folder from a job that is gone" in third.stderr and "its process has ended" in third.stderr
    )
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["step"] == 3
    assert not (run_dir / LEASE_FILE).exists()  # given back at the end
    assert sys.executable  # (the job ran with this interpreter's environment)


ORPHAN = (
    "import time\n"
    "from clipscale.job.proc import exit_when_parent_dies\n"
    "exit_when_parent_dies('rank 0', poll_s=0.2)\n"
    "time.sleep(600)\n"
)


@pytest.mark.parametrize("stderr", ["a full pipe", "a pipe without a reader"])
def test_an_orphaned_rank_exits_whatever_its_stderr_became(stderr):
    """The launcher's death may leave a rank's stderr a pipe nobody drains (a write blocks forever) or one
    nobody reads any more (a write fails): neither may keep the rank alive to write into its run folder."""
    import fcntl

    read_end, write_end = os.pipe()
    if stderr == "a full pipe":
        fcntl.fcntl(write_end, fcntl.F_SETFL, os.O_NONBLOCK)
        try:
            while True:
                os.write(write_end, b"x" * 65536)
        except BlockingIOError:
            pass
        fcntl.fcntl(write_end, fcntl.F_SETFL, 0)
    launcher_code = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', {ORPHAN!r}], stderr={write_end}, pass_fds=({write_end},))\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    launcher = subprocess.Popen([sys.executable, "-c", launcher_code], stdout=subprocess.PIPE, text=True,
                                pass_fds=(write_end,))  # fmt: skip
    rank = psutil.Process(int(launcher.stdout.readline()))
    os.close(write_end)
    if stderr == "a pipe without a reader":
        os.close(read_end)
    time.sleep(3)  # the rank is up and watching
    launcher.kill()
    launcher.wait()
    gone, alive = psutil.wait_procs([rank], timeout=10)
    for p in alive:
        p.kill()
    if stderr == "a full pipe":
        os.close(read_end)
    assert not alive, f"an orphaned rank with {stderr} as stderr kept running"
