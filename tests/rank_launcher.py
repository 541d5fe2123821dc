"""`python rank_launcher.py N python-args...`: N ranks of a training command, with the variables
torchrun gives them (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), and
without importing torch.

The suite starts over a hundred multi-rank jobs; torchrun's own start-up (it imports torch before a
rank starts) was about 2 CPU seconds and 2 s of waiting of each. The tests about torchrun itself
(signals it forwards, --max-restarts, the launcher's one-line endings, SLURM's sbatch scripts,
several nodes) still start it: process_helpers.command(torchrun_args=...) and the sbatch scripts.

As torchrun does: signals sent to this process (SIGTERM, SIGINT, SIGUSR1, SIGUSR2) are passed on to
every rank; when a rank fails, the others get a few seconds to stop and are then killed; the exit
code is the first failing rank's (0 when every rank succeeds).
"""

import os
import signal
import socket
import subprocess
import sys
import time

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
GRACE_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    world, args = int(sys.argv[1]), sys.argv[2:]
    common = {
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    ranks = [
        subprocess.Popen([sys.executable, *args], env={**os.environ, **common, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(world)
    ]
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
