import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tests run several processes on 2 cores

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy_shards(tmp_path_factory):
    """4 shards x 16 colour/shape pairs (64 samples) with a manifest."""
    from helpers import make_shards

    return make_shards(tmp_path_factory.mktemp("toy"), n_shards=4, per_shard=16)


def once_per_run(tmp_path_factory, name, make):
    """`make(folder)`'s result, computed once for the whole pytest run: under pytest-xdist the
    workers share it through a lock in their common temporary folder instead of each paying."""
    import pickle
    import shutil

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this run
    folder, done = root / f"shared-{name}", root / f"shared-{name}.pickle"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed here left half-made
            folder.mkdir()
            done.write_bytes(pickle.dumps(make(folder)))
        return pickle.loads(done.read_bytes())


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """module_tmp(name): a folder that lives as long as the test module, removed after it when none of
    its tests failed (kept for reading otherwise). With tmp_path_retention_policy = "failed" this keeps
    the suite's disk use to a few GB at any moment instead of the ~20 GB of checkpoints it writes."""
    import shutil

    made, failed_before = [], request.session.testsfailed

    def make(name: str):
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    if request.session.testsfailed == failed_before:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def curve_shards(tmp_path_factory):
    """8 shards x 16 pairs: what the engines are trained on to compare their loss curves."""
    from helpers import make_shards

    return once_per_run(tmp_path_factory, "curve_shards", lambda out: make_shards(out, n_shards=8, per_shard=16))


@pytest.fixture(scope="session")
def ddp_curves(tmp_path_factory, curve_shards):
    """DDP's loss curves, the reference of every other engine: plain, and with accumulation +
    gradient checkpointing (2 processes, process_helpers.CURVE); run once per test run. "plain_dir" is
    the plain run's folder (the uninterrupted reference of DDP's kill-and-resume test: read, never write)."""
    from process_helpers import CURVE, CURVE_ACCUM, losses, run

    def make(root):
        run(2, root / "plain", curve_shards, *CURVE)
        run(2, root / "accum", curve_shards, *CURVE, *CURVE_ACCUM)
        return {"plain": losses(root / "plain"), "accum": losses(root / "accum"), "plain_dir": root / "plain"}

    return once_per_run(tmp_path_factory, "ddp_curves", make)


@pytest.fixture(autouse=True)
def no_watching_hang_watchdog_is_left_behind():
    """A test that leaves a Trainer's hang watchdog watching would have it kill pytest itself
    (os._exit) half an hour later, in whatever test runs then: fail the test that left it."""
    import threading

    yield
    left = []
    for thread in threading.enumerate():
        dog = getattr(getattr(thread, "_target", None), "__self__", None)
        if thread.name == "clipscale-hang-watchdog" and dog is not None and dog.watching:
            left.append(dog.watching)
            dog.stop()
    assert not left, f"a hang watchdog was left watching ({left}): close the Trainer (`with Trainer(...)`)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """CLIPSCALE_TEST_CPU_LOG=FILE: one line per test with its wall and CPU seconds (this process and
    the child processes it waited for; not the ranks distributed_helpers forks from its fork server):
    which tests cost the suite's 2 cores and which only wait."""
    path = os.environ.get("CLIPSCALE_TEST_CPU_LOG")
    if not path:
        yield
        return
    import json
    import resource
    import time

    def cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    start, start_cpu = time.monotonic(), cpu()
    yield
    line = {"test": item.nodeid, "wall": round(time.monotonic() - start, 2), "cpu": round(cpu() - start_cpu, 2)}
    with open(path, "a") as out:
        out.write(json.dumps(line) + "\n")
