"""Workers never fork a process that runs threads (issue 29, item 3): DataLoader and pool workers
come from a fork server that runs one thread, forked early from a rank or started as a new
interpreter; it and its workers outlive a job's stop signals until the rank decides."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rank_launcher import free_port

HERE = Path(__file__).parent


@pytest.mark.parametrize("mode", ["early", "late"])
def test_200_loaders_start_beside_busy_threads_without_a_hang(mode):
    """A thread logs and another allocates without pause (their locks are held most of the time) and
    a gloo group runs its threads, while 200 DataLoaders start a worker each: forked from this
    process, such a worker soon waits for ever on a lock no thread of it will release (3 of 3 runs
    of the same script with `fork` hung); from the fork server, every one starts."""
    out = subprocess.run(
        [sys.executable, str(HERE / "fork_under_threads.py"), mode, "200", str(free_port())],
        capture_output=True,
        text=True,
        timeout=240,  # the deadline: a hang fails here
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["workers"] == 200
    assert report["self"] not in report["parents"] and len(report["parents"]) == 1  # one server made them all
    assert report["max_parent_threads"] == 1  # and it ran one thread whenever it forked


def test_the_server_and_its_workers_outlive_a_stop_signal_until_told(tmp_path):
    """SLURM signals every process of a job: the fork server must not die of it (its workers would
    follow, and the rank's last batch with them), and a pool worker keeps SIGTERM's default."""
    script = tmp_path / "pool.py"
    script.write_text(
        "import os, signal, sys, time\n"
        f"sys.path.insert(0, {str(HERE.parent / 'src')!r})\n"
        "from clipscale.job import workers\n"
        "def sleepy(_):\n"
        "    time.sleep(60)\n"
        "if __name__ == '__main__':\n"
        "    assert workers.start_early()\n"
        "    from multiprocessing import forkserver\n"
        "    with workers.pool(1) as pool:\n"
        "        pool.map_async(sleepy, [0])\n"
        "        time.sleep(1.5)\n"
        "        kids = [p.pid for p in pool._pool]\n"
        "        print(forkserver._forkserver._forkserver_pid, *kids, flush=True)\n"
        "        time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        server, worker = map(int, proc.stdout.readline().split())
        os.kill(server, signal.SIGTERM)
        os.kill(server, signal.SIGUSR1)
        time.sleep(1.0)
        assert Path(f"/proc/{server}").exists()  # blocked: it lives on
        os.kill(worker, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{worker}").exists() and _state(worker) != "Z" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{worker}").exists() or _state(worker) == "Z"  # the default: it ended
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{server}").exists() and _state(server) != "Z" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{server}").exists() or _state(server) == "Z"  # gone with the process that made it


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"
