"""DataLoader workers and SLURM's signals: SLURM signals every process of a job, so workers
ignore the preemption signals (the main process decides), and a loader left open must still
let the interpreter exit."""

import os
import signal
import subprocess
import sys
import textwrap
import time

from clipscale.data.loader import TrainData
from clipscale.distributed import init_distributed
from clipscale.model import create_model

from helpers import REPO, tiny_config

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from helpers import tiny_config
    from clipscale.data.loader import TrainData
    from clipscale.distributed import init_distributed
    from clipscale.model import create_model
    cfg = tiny_config({run!r}, {shards!r}, data__workers=2)
    bundle = create_model(cfg.model)
    data = TrainData(cfg, bundle.train_transform, bundle.tokenizer, init_distributed("cpu"), None)
    batch = data.next()
    try:
        raise RuntimeError("a traceback that keeps frames (and the loader) alive")
    except RuntimeError as exn:
        kept = exn
    print("done", flush=True)
""")


def test_a_loader_left_open_does_not_hang_interpreter_exit(tmp_path, toy_shards):
    script = SCRIPT.format(tests=str(REPO / "tests"), run=str(tmp_path / "run"), shards=toy_shards)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-2000:]


def test_workers_survive_sigterm_and_the_stream_goes_on(tmp_path, toy_shards):
    import psutil

    cfg = tiny_config(tmp_path / "run", toy_shards, data__workers=2, data__batch_size=4)
    bundle = create_model(cfg.model)
    data = TrainData(cfg, bundle.train_transform, bundle.tokenizer, init_distributed("cpu"), None)
    before = {p.pid for p in psutil.Process(os.getpid()).children()}
    try:
        data.next()
        workers = [p for p in psutil.Process(os.getpid()).children() if p.pid not in before]
        assert len(workers) == 2
        for w in workers:
            w.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
        keys = [k for _ in range(6) for k in data.next()[0]["keys"]]
        assert len(keys) == 24 and len(set(keys)) == 24
    finally:
        data.close()
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
