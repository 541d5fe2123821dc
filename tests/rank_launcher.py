"""`python rank_launcher.py N python-args...`: N ranks of a training command, with the variables
torchrun gives them (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

The suite starts over a hundred multi-rank jobs, and a rank's own start-up (importing torch,
open_clip and timm: about 3 CPU seconds) cost more than most of their training. For `-m MODULE`
commands this launcher imports the module's dependencies once and forks the ranks from itself,
so each job pays for one import, not one per rank; it forks only while it runs a single thread
(no lock can be held by a thread the child would lack), else it starts each rank with exec as
before. torchrun's own start-up (it imports torch before a rank starts) is skipped too. The tests
about torchrun itself (signals it forwards, --max-restarts, the launcher's one-line endings,
SLURM's sbatch scripts, several nodes) still start it: process_helpers.command(torchrun_args=...)
and the sbatch scripts.

As torchrun does: signals sent to this process (SIGTERM, SIGINT, SIGUSR1, SIGUSR2) are passed on to
every rank; when a rank fails, the others get a few seconds to stop and are then killed; the exit
code is the first failing rank's (0 when every rank succeeds).
"""

import importlib
import os
import runpy
import signal
import socket
import subprocess
import sys
import time

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
GRACE_S = 10.0
PRELOAD = {"clipscale.train": ("clipscale.train.run", "clipscale.engine", "clipscale.data.loader")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ForkedRank:
    """A rank forked from this launcher (the Popen calls the launcher uses)."""

    def __init__(self, module: str, args: list[str], env: dict[str, str]):
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid, self.returncode = os.fork(), None
        if self.pid == 0:  # the rank: what `python -m module args` would do, then exit as it would
            os.environ.update(env)
            sys.argv = [module, *args]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            sys.exit(0)

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum):
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def single_threaded() -> bool:
    return len(os.listdir("/proc/self/task")) == 1


def start_ranks(world: int, args: list[str], common: dict[str, str]):
    envs = [{**common, "RANK": str(r), "LOCAL_RANK": str(r)} for r in range(world)]
    module = args[1] if len(args) > 1 and args[0] == "-m" else None
    if module in PRELOAD:
        for name in PRELOAD[module]:
            importlib.import_module(name)
        if single_threaded():
            return [ForkedRank(module, args[2:], env) for env in envs]
    return [subprocess.Popen([sys.executable, *args], env={**os.environ, **env}) for env in envs]


def main() -> int:
    world, args = int(sys.argv[1]), sys.argv[2:]
    common = {
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    ranks = start_ranks(world, args, common)
    for sig in FORWARDED:
        signal.signal(sig, lambda signum, frame: [p.send_signal(signum) for p in ranks if p.poll() is None])
    failed_at = None
    code = 0
    while any(p.poll() is None for p in ranks):
        failed = [p for p in ranks if p.poll() not in (None, 0)]
        if failed and failed_at is None:
            failed_at, code = time.monotonic(), failed[0].returncode
        if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
            for p in ranks:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)
    if code == 0:
        code = next((p.returncode for p in ranks if p.returncode != 0), 0)
    return code if code >= 0 else 128 - code  # a rank killed by a signal: as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
