"""Run a function in N real processes joined by a gloo process group (CPU)."""

from __future__ import annotations

import io
import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world, init_file, fn, args, results):
    import signal

    from clipscale.job.workers import STOP_SIGNALS

    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # (the fork server holds them blocked)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        out = fn(rank, world, *args)
        buf = io.BytesIO()
        torch.save(out, buf)  # plain bytes: shared-memory tensors would die with this process
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# What every rank imports, imported once per test process by the fork server that forks the
# ranks: a spawned rank paid ~3 CPU seconds for it, more than most of its work. The server is a
# fresh single-threaded process (OMP_NUM_THREADS=1, set by conftest.py): forking it is safe.
PRELOAD = ["torch", "open_clip", "clipscale.train.run", "clipscale.engine", "clipscale.data.loader"]


def _context():
    """The process's one fork server, started as clipscale starts it (stop signals blocked: the
    DataLoader workers of later tests in this process come from it too); ranks unblock them."""
    from multiprocessing import forkserver

    from clipscale.job import workers

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    with workers._stop_signals_blocked():
        forkserver.ensure_running()
    return ctx


def run_distributed(fn, world: int, *args, timeout: float = 300):
    """fn(rank, world, *args) in `world` processes; returns the results ordered by rank."""
    ctx = _context()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_entry, args=(r, world, init_file, fn, args, results)) for r in range(world)]
        for p in procs:
            p.start()
        out = {}
        try:
            for _ in range(world):
                rank, status, value = results.get(timeout=timeout)
                if status != "ok":
                    raise AssertionError(f"rank {rank} failed:\n{value}")
                out[rank] = torch.load(io.BytesIO(value), weights_only=False)
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    return [out[r] for r in range(world)]
