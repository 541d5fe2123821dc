"""`python fork_under_threads.py MODE N`: start DataLoader workers N times from a process that runs
threads holding locks, as a trainer does, and report where every worker came from.

MODE "early": job.workers.start_early() before any thread (what a rank does); "late": the standard
fork server, started by the first loader; "fork": the old way, workers forked from this process
(for showing that the threads below make it hang; not run by the suite).

While the loaders start, three threads run: one logs without pause (the logging handler's lock is
held most of the time; each worker logs too, so a worker forked while that lock was held waits on
it for ever), one allocates and frees (the allocator's locks), and a gloo process group of one rank
has its own threads. Prints one JSON line: workers started, the distinct parents, and the most
threads any parent ran when its worker reported."""

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from clipscale.job import workers  # noqa: E402

log = logging.getLogger("fork-test")


class WhereFrom(IterableDataset):
    """One item: this worker's parent and how many threads that parent runs now."""

    def __iter__(self):
        log.warning("worker %d up", os.getpid())  # takes the handler's lock
        parent = os.getppid()
        yield {"pid": os.getpid(), "parent": parent, "parent_threads": len(os.listdir(f"/proc/{parent}/task"))}


def busy_threads(stop: threading.Event) -> None:
    def logger():
        while not stop.wait(0.001):  # bursts, leaving the GIL to the main thread in between
            for _ in range(20):
                log.warning("busy")

    def allocator():
        while not stop.wait(0.001):
            for _ in range(20):
                torch.empty(1 << 16).fill_(1.0)

    for target in (logger, allocator):
        threading.Thread(target=target, daemon=True).start()


def main(mode: str, times: int) -> None:
    logging.basicConfig(stream=open(os.devnull, "w"), level=logging.WARNING)  # noqa: SIM115
    if mode == "early":
        assert workers.start_early(), "the fork server could not be forked early"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
    dist.init_process_group("gloo", rank=0, world_size=1)
    stop = threading.Event()
    busy_threads(stop)
    context = "fork" if mode == "fork" else workers.context(1)
    seen, started = [], time.monotonic()
    for _ in range(times):
        seen.extend(DataLoader(WhereFrom(), batch_size=None, num_workers=1, multiprocessing_context=context))
    stop.set()
    dist.destroy_process_group()
    print(
        json.dumps(
            {
                "workers": len(seen),
                "parents": sorted({s["parent"] for s in seen}),
                "self": os.getpid(),
                "max_parent_threads": max(s["parent_threads"] for s in seen),
                "seconds": round(time.monotonic() - started, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
