"""DataLoader workers and SLURM's signals: SLURM signals every process of a job, so workers
ignore the preemption signals (the main process decides), and a loader left open must still
let the interpreter exit."""

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from clipscale.job.distributed import init_distributed
from clipscale.model import create_model

from helpers import REPO, make_train_data, tiny_config

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from helpers import make_train_data, tiny_config
    from clipscale.job.distributed import init_distributed
    from clipscale.model import create_model
    cfg = tiny_config({run!r}, {shards!r}, data__workers=2)
    bundle = create_model(cfg.model)
    data = make_train_data(cfg, bundle.train_transform, bundle.tokenizer, init_distributed("cpu"))
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


@pytest.mark.parametrize("default", ["spawn", "forkserver"])
def test_workers_start_whatever_the_interpreters_default_start_method(tmp_path, toy_shards, default):
    """Python 3.14 made forkserver the default; the loader asks for the fork server itself whatever the
    default (job.workers), and its dataset pickles (a platform without it starts its workers by spawn)."""
    script = "import multiprocessing\n" + f"multiprocessing.set_start_method({default!r}, force=True)\n"
    script += SCRIPT.format(tests=str(REPO / "tests"), run=str(tmp_path / "run"), shards=toy_shards)
    script += "print(data.loader.multiprocessing_context.get_start_method(), flush=True)\n"
    script += "import pickle; print(type(pickle.loads(pickle.dumps(data.dataset))).__name__)\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["done", "forkserver", "StreamDataset"], proc.stdout


def test_workers_survive_sigterm_and_the_stream_goes_on(tmp_path, toy_shards):
    import psutil

    cfg = tiny_config(tmp_path / "run", toy_shards, data__workers=2, data__batch_size=4)
    bundle = create_model(cfg.model)
    data = make_train_data(cfg, bundle.train_transform, bundle.tokenizer, init_distributed("cpu"))
    try:
        data.next()
        workers = [psutil.Process(w.pid) for w in data._iter._workers]  # (the fork server's children)
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


def slow_init(marks, names, worker_id=0):
    """The workers' init held back 1.5 s (module level: workers come from a fork server, so it is pickled)."""
    from clipscale.job.preempt import ignore_signals

    (Path(marks) / str(os.getpid())).touch()
    time.sleep(1.5)
    ignore_signals(names, worker_id)


def test_a_sigterm_before_the_workers_ignore_it_does_not_kill_them(tmp_path, toy_shards, monkeypatch):
    """The workers start with the preemption signals blocked (the fork server's mask): a SIGTERM that
    reaches a worker before its init function has ignored it waits, and is then dropped (here the
    init is held back on purpose, so the window is 1.5 s wide instead of a few milliseconds)."""
    import threading

    import psutil

    from clipscale.data import loader as loader_module

    marks = tmp_path / "marks"
    marks.mkdir()

    monkeypatch.setattr(loader_module, "ignore_signals", functools.partial(slow_init, str(marks)))
    cfg = tiny_config(tmp_path / "run", toy_shards, data__workers=2, data__batch_size=4)
    bundle = create_model(cfg.model)
    data = make_train_data(cfg, bundle.train_transform, bundle.tokenizer, init_distributed("cpu"))
    signalled = []

    def signal_workers_in_init():
        deadline = time.time() + 60
        while len(signalled) < 2 and time.time() < deadline:
            for mark in marks.iterdir():
                if int(mark.name) not in signalled:
                    os.kill(int(mark.name), signal.SIGTERM)
                    signalled.append(int(mark.name))
            time.sleep(0.01)

    thread = threading.Thread(target=signal_workers_in_init)
    thread.start()
    try:
        keys = [k for _ in range(6) for k in data.next()[0]["keys"]]
        thread.join()
        assert len(signalled) == 2 and len(keys) == 24 and len(set(keys)) == 24
        assert all(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in signalled)
    finally:
        thread.join()
        data.close()


ORPHAN_PARENT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from helpers import make_train_data, tiny_config
    from clipscale.job.distributed import init_distributed
    from clipscale.model import create_model
    cfg = tiny_config({run!r}, {shards!r}, data__workers=2, data__manifest={manifest!r}, data__read_timeout_s="null")
    bundle = create_model(cfg.model)
    data = make_train_data(cfg, bundle.train_transform, bundle.tokenizer, init_distributed("cpu"))
    print("reading", flush=True)
    data.next()  # the workers block in a read that takes minutes
""")


def test_workers_exit_when_their_parent_is_killed(tmp_path, toy_shards):
    """A worker busy in a read never reaches torch's parent check; the kernel ends it (PDEATHSIG)."""
    import psutil

    folder = os.path.dirname(toy_shards)
    slow = "::".join(f"pipe:sleep 45; cat {folder}/toy-00000{i}.tar" for i in range(4))
    script = ORPHAN_PARENT.format(
        tests=str(REPO / "tests"), run=str(tmp_path / "run"), shards=slow, manifest=f"{folder}/manifest.json"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "reading"
        deadline = time.time() + 60
        workers = []
        while len(workers) < 2 and time.time() < deadline:
            children = psutil.Process(proc.pid).children()
            workers = [p for p in children if "python" in " ".join(p.cmdline())]  # comm is pt_data_worker
            time.sleep(0.1)
        assert len(workers) == 2
        time.sleep(1.0)  # both inside their read
        proc.kill()
        proc.wait()
        gone, alive = psutil.wait_procs(workers, timeout=15)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [p.pid for p in alive]

        def pipe_commands():
            found = []
            for p in psutil.process_iter(["cmdline", "status"]):
                line = " ".join(p.info["cmdline"] or [])
                if "sleep 45" in line and (folder in line or line == "sleep 45") and p.info["status"] != "zombie":
                    found.append(p)
            return found

        deadline = time.time() + 15  # the pipes' watchers notice the dead reader within a second or two
        while pipe_commands() and time.time() < deadline:
            time.sleep(0.2)
        assert not pipe_commands(), "the shard commands outlived their data worker"
    finally:
        proc.kill()
        for p in psutil.process_iter(["cmdline"]):
            if "sleep 45; cat" in " ".join(p.info["cmdline"] or []) and folder in " ".join(p.info["cmdline"] or []):
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # the pipe command and its sleep (their own group)
                except OSError:
                    pass
