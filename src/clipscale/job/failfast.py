"""One rank's failure stops every rank within seconds, with the same one line.

A rank that fails while the others wait for it in a collective (a checkpoint it cannot load, a
save, its start-up) would leave them waiting until engine.dist_timeout_s (30 minutes by default;
with NCCL nothing else notices), or failing later with a transport error that names nothing
("Connection closed by peer"). So a failing rank first announces its error in the rendezvous store
(the first announcement wins: compare_set), and every rank checks that key from a thread every
POLL_S seconds, on a connection of its own. A rank woken by another's announcement prints the same
line, the main rank writes status.json `failed` with it, and the rank exits with the same code; it
counts itself in the store first, and the failing rank waits (a few seconds at most) until every
other rank has, since the store may live in its process (rank 0 under srun). A rank whose own error
may be a consequence (its collective broke because the other rank left) asks `cause()` first and reports
the announced error instead of its own.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
import time
from pathlib import Path

import torch.distributed as dist

from ..errors import EXIT_UNREADABLE
from .status import write_status

log = logging.getLogger(__name__)

KEY = "clipscale/failed"
POLL_S = 5.0  # one check per rank every 5 s: 200 small requests a second at 1,000 ranks


class FailFast:
    def __init__(self, rank: int, world_size: int, run_dir: Path, restart_count: int = 0):
        self.rank, self.world_size, self.run_dir = rank, world_size, Path(run_dir)
        self.key = f"{KEY}/restart{restart_count}"  # a restarted round must not read the last one's
        self.address = None
        self._reported = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if world_size > 1 and os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
            self.address = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
            try:
                watching = self._connect()
            except Exception as exn:  # noqa: BLE001 - without it a failure is noticed as before
                log.warning(
                    "no fail-fast channel (%s: %s): a failing rank is noticed by collectives", type(exn).__name__, exn
                )
                self.address = None
                return
            self._thread = threading.Thread(
                target=self._watch, args=(watching,), name="clipscale-failfast", daemon=True
            )
            self._thread.start()

    def _connect(self):
        """A store client of its own: a client blocked in wait() holds its connection (the process
        group's, and the watcher's, must never wait behind another call)."""
        host, port = self.address
        timeout = datetime.timedelta(seconds=5)  # on a failing exit: a store that is gone must not cost long
        return dist.TCPStore(host, port, is_master=False, timeout=timeout, wait_for_workers=False)

    def announce(self, code: int, line: str) -> None:
        """This rank failed: tell the others (the first announcement of the job stands) and give them
        the time to read it (the store may live in this process)."""
        if self.address is None:
            return
        try:
            store = self._connect()
            mine = f"{self.rank}|{code}|{line}"
            if store.compare_set(self.key, "", mine).decode() != mine:  # another rank's stands: we know
                store.set(f"{self.key}/stopped/{self.rank}", "1")
                return
            others = [f"{self.key}/stopped/{r}" for r in range(self.world_size) if r != self.rank]
            deadline = time.monotonic() + 2 * POLL_S + 2
            while not store.check(others) and time.monotonic() < deadline:
                time.sleep(0.1)
        except Exception:  # noqa: BLE001 - the store may be gone with rank 0: the collectives still fail
            pass

    def cause(self, wait_s: float = 2.0) -> tuple[int, str, int] | None:
        """(code, line, rank) announced by another rank (waiting up to `wait_s` for one), or None."""
        if self.address is None:
            return None
        try:
            store = self._connect()
            store.wait([self.key], datetime.timedelta(seconds=wait_s))
            rank, code, line = store.get(self.key).decode().split("|", 2)
        except Exception:  # noqa: BLE001 - nobody announced (or the store is gone)
            return None
        return None if int(rank) == self.rank else (int(code), line, int(rank))

    def _watch(self, store) -> None:
        """Every POLL_S, one check of the key (a blocking wait would sit in C++ when the interpreter
        exits, and a store server that left with rank 0 then aborts the process)."""
        while not self._stop.wait(POLL_S):
            try:
                if not store.check([self.key]):
                    continue
                rank, code, line = store.get(self.key).decode().split("|", 2)
            except Exception:  # noqa: BLE001 - the store is gone with rank 0: the job is ending
                return
            if int(rank) != self.rank:
                self.stop_as(int(code), line, int(rank))
            return

    def close(self) -> None:
        """Stop watching (the job ends): before the interpreter does."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=POLL_S + 5)

    def stop_as(self, code: int, line: str, rank: int) -> None:
        """End this rank with another rank's error (once per process: the watcher or the main thread)."""
        if not self._reported.acquire(blocking=False):
            return
        print(f"clipscale: error: {line}", file=sys.stderr, flush=True)
        try:
            self._connect().set(f"{self.key}/stopped/{self.rank}", "1")
        except Exception:  # noqa: BLE001 - the failing rank waits a few seconds at most
            pass
        if self.rank == 0:
            try:
                state = "unreadable" if code == EXIT_UNREADABLE else "failed"
                write_status(self.run_dir, state, error=f"rank {rank}: {line}"[:500])
            except OSError:
                pass
        os._exit(code)
