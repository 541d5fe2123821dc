"""slurm/train.sbatch and slurm/train-srun.sbatch on a real one-node SLURM cluster
(tools/local_slurm.sh: Debian's slurmctld + slurmd + munge), CPU, 2 processes, gloo."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from clipscale.checkpoint import CheckpointManager
from clipscale.job.watchdog import EXIT_HUNG
from clipscale.metrics import read_jsonl, read_sample_keys

from helpers import REPO, make_shards
from process_helpers import logged_steps

pytestmark = pytest.mark.slow
LOCAL_SLURM = REPO / "tools" / "local_slurm.sh"
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
UNSCHEDULABLE = ("PartitionConfig", "ReqNodeNotAvail", "BadConstraints", "PartitionNodeLimit", "Resources_Unavailable")
TRAIN = [
    "model.name=clip-tiny",
    "model.precision=fp32",
    "data.batch_size=4",
    "data.workers=2",
    "data.shuffle_buffer=16",
    "logging.every_n_steps=1",
    "logging.progress=false",
    "logging.sample_keys=true",
    "schedule.warmup_steps=2",
    "optim.lr=1e-3",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """SLURM_CONF of a running local cluster; stopped after the module."""
    if not shutil.which("sbatch") or not shutil.which("slurmctld"):
        pytest.fail("SLURM is not installed: run `sudo tools/local_slurm.sh install` (CI does it in .ci/run)")
    env = {**os.environ, "CLIPSCALE_SLURM_DIR": str(tmp_path_factory.mktemp("slurm"))}
    started = subprocess.run(["bash", str(LOCAL_SLURM), "start"], env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    conf = re.search(r"SLURM_CONF=(\S+)", started.stdout).group(1)
    # a clean launcher environment: in-process DeepSpeed tests may have set RANK/WORLD_SIZE here
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    yield {**clean, "SLURM_CONF": conf, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    subprocess.run(["bash", str(LOCAL_SLURM), "stop"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("slurm_shards"), n_shards=8, per_shard=16)


def submit(cluster, script, run_dir, log, *overrides, sbatch_args=(), **env):
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--gpus-per-node=0",
            f"--output={log}",
            f"--chdir={REPO}",
            *sbatch_args,
            str(REPO / "slurm" / script),
            *TRAIN,
            *overrides,
        ],
        env={**cluster, "CONFIG": "configs/demo-cpu.yaml", "RUN_DIR": str(run_dir), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_info(cluster, job_id) -> dict:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], env=cluster, capture_output=True, text=True, timeout=30
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def diagnose(cluster, job_id, log) -> str:
    """What a failed wait shows: the job's record, the node's state and the job log's tail."""
    run = lambda *cmd: subprocess.run(cmd, env=cluster, capture_output=True, text=True, timeout=30).stdout
    return "\n".join(
        [
            run("scontrol", "show", "job", job_id),
            run("sinfo", "-N", "-l"),
            log.read_text()[-3000:] if log.exists() else "(no job log yet)",
        ]
    )


def wait_steps(cluster, job_id, log, run_dir, n, timeout=300) -> int:
    """Wait until the run has logged step n; the last logged step."""
    deadline = time.time() + timeout
    while logged_steps(run_dir) < n:
        assert time.time() < deadline, diagnose(cluster, job_id, log)
        assert job_info(cluster, job_id).get("Reason") not in UNSCHEDULABLE, diagnose(cluster, job_id, log)
        time.sleep(0.2)
    return logged_steps(run_dir)


def wait_done(cluster, job_id, log, timeout=400) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(cluster, job_id)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        time.sleep(0.5)
    message = diagnose(cluster, job_id, log)
    subprocess.run(["scancel", job_id], env=cluster)
    raise AssertionError(f"job {job_id} did not end in {timeout}s:\n{message}")


def test_sbatch_two_process_run_finishes_with_metrics_and_checkpoint(cluster, shards, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(
        cluster,
        "train.sbatch",
        run_dir,
        log,
        f"data.train_shards={shards}",
        "train.steps=6",
        "checkpoint.every_n_steps=2",
        NPROC_PER_NODE="2",
    )
    info = wait_done(cluster, job, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", text[-3000:]
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["step"], status["world_size"], status["requeue_count"]) == ("finished", 6, 2, 0)
    final = CheckpointManager(run_dir, is_main=False).latest()
    assert final.name == "step_00000006.pt" and status["checkpoint"] == str(final)
    assert {r["rank"] for r in read_sample_keys(run_dir)} == {0, 1}
    assert f"[job {job} requeue0] clipscale on 1 node(s)" in text and "x 2 process(es)" in text
    assert "[rank0] INFO step 6 " in text


def test_sbatch_preempted_by_usr1_requeues_itself_and_resumes(cluster, shards, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    steps = 40
    job = submit(
        cluster,
        "train.sbatch",
        run_dir,
        log,
        f"data.train_shards={shards}",
        f"train.steps={steps}",
        "checkpoint.every_n_steps=1000",
        NPROC_PER_NODE="2",
    )
    signalled_at = wait_steps(cluster, job, log, run_dir, 3)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True, timeout=30)
    info = wait_done(cluster, job, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    resumed = re.search(r"\[rank0 requeue1\] INFO resumed from \S+step_(\d+)\.pt at step (\d+)", text)
    assert resumed, text[-4000:]
    at = int(resumed.group(2))
    requested = re.search(r"preemption requested \(SIGUSR1 during step (\d+)\): saving at step (\d+)", text)
    assert requested, text[-4000:]
    during, saved = int(requested.group(1)), int(requested.group(2))
    assert int(resumed.group(1)) == at == saved and signalled_at <= during <= at <= during + 1, (
        signalled_at,
        during,
        at,
    )
    assert f"preempted at step {at}: requeueing job {job}" in text
    assert f"[job {job} requeue1] clipscale on 1 node(s)" in text  # the log was appended to, not truncated
    steps_logged = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps_logged == list(range(1, steps + 1))  # every step once: none lost, none repeated
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["step"], status["requeue_count"]) == ("finished", steps, 1)
    assert CheckpointManager(run_dir, is_main=False).latest().name == f"step_{steps:08d}.pt"


def test_scancel_checkpoints_and_does_not_requeue(cluster, shards, tmp_path):
    """Plain scancel signals every process of the job (DataLoader workers too) with SIGTERM: the run
    saves a checkpoint and stops; the user meant to cancel, so there is no requeue."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(
        cluster,
        "train.sbatch",
        run_dir,
        log,
        f"data.train_shards={shards}",
        "train.steps=200",
        "checkpoint.every_n_steps=1000",
        NPROC_PER_NODE="2",
    )
    wait_steps(cluster, job, log, run_dir, 2)
    started = time.time()
    subprocess.run(["scancel", job], env=cluster, check=True, timeout=30)
    info = wait_done(cluster, job, log)
    assert time.time() - started < 45  # stopped by itself, not killed after KillWait (60 s here)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0"
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["signal"]) == ("preempted", "SIGTERM"), log.read_text()[-3000:]
    assert CheckpointManager(run_dir, is_main=False).latest().name == f"step_{status['step']:08d}.pt"


def test_srun_variant_two_tasks_preempted_and_resumed(cluster, shards, tmp_path):
    """slurm/train-srun.sbatch: no torchrun; clipscale reads SLURM_PROCID/NTASKS/LOCALID itself."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(
        cluster,
        "train-srun.sbatch",
        run_dir,
        log,
        f"data.train_shards={shards}",
        "train.steps=20",
        "checkpoint.every_n_steps=1000",
        sbatch_args=("--ntasks-per-node=2",),
    )
    wait_steps(cluster, job, log, run_dir, 3)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True, timeout=30)
    info = wait_done(cluster, job, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    assert "2 process(es) on cpu" in text and "[rank0 requeue1] INFO resumed from" in text
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 21))
    assert {r["rank"] for r in read_sample_keys(run_dir)} == {0, 1}


def training_process(run_dir, rank: int):
    """The training process (not a DataLoader worker: those are its children) of `rank` in this run."""
    import psutil

    def is_rank(p):
        try:
            cmd = " ".join(p.cmdline())
            return "clipscale.train" in cmd and f"run.dir={run_dir}" in cmd and p.environ().get("RANK") == str(rank)
        except (psutil.Error, OSError):
            return False

    found = [p for p in psutil.process_iter() if is_rank(p)]
    return [p for p in found if not any(p.ppid() == q.pid for q in found)]


def freeze_rank_1_and_wait_for_the_report(run_dir, timeout, diagnosis):
    """SIGSTOP rank 1's training process; the path of rank 0's hang report, written in time."""
    import signal

    frozen = training_process(run_dir, 1)
    assert len(frozen) == 1, frozen
    frozen[0].send_signal(signal.SIGSTOP)
    stopped_at = time.time()
    while not list((run_dir / "hang").glob("rank0-*.txt")):
        assert time.time() < stopped_at + timeout + 60, diagnosis()
        time.sleep(0.2)
    time.sleep(1)  # written and fsynced before the status; let the process finish them
    return next((run_dir / "hang").glob("rank0-*.txt"))


def test_a_frozen_rank_is_caught_by_the_watchdog_and_the_run_requeued(cluster, shards, tmp_path):
    """SIGSTOP one rank: the other waits in its all-reduce until the watchdog reports its stacks and
    exits with EXIT_HUNG; supervise requeues; the requeued job resumes and finishes."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    steps, timeout = 30, 12
    job = submit(
        cluster,
        "train.sbatch",
        run_dir,
        log,
        f"data.train_shards={shards}",
        f"train.steps={steps}",
        "checkpoint.every_n_steps=5",
        f"train.hang_timeout_s={timeout}",
        "train.hang_grace_s=40",  # the stop may fall into a checkpoint save (its barrier): grace applies
        "data.read_timeout_s=10",
        NPROC_PER_NODE="2",
        SHUTDOWN_TIMEOUT="5",
    )
    try:
        wait_steps(cluster, job, log, run_dir, 8)
        hung_at = freeze_rank_1_and_wait_for_the_report(run_dir, timeout, lambda: diagnose(cluster, job, log))
    except BaseException:
        subprocess.run(["scancel", job], env=cluster, timeout=30)  # no supervise left to requeue it later
        raise
    stacks = hung_at.read_text()
    # waiting in a collective: the feature all-gather shows as a Python frame, DDP's gradient all-reduce
    # runs in C++ inside backward; the report names what the loop was doing
    assert "in: " in stacks, stacks[:3000]
    in_gather = "distributed_c10d.py" in stacks
    assert in_gather or re.search(r"engine/ddp\.py\", line \d+ in backward", stacks), stacks
    info = wait_done(cluster, job, log, timeout=600)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    assert "run state: hung" in text and f": requeueing job {job}" in text, text[-4000:]
    assert f"exited with code {EXIT_HUNG} (hung" in text
    assert not list((run_dir / "hang").glob("rank1-*.txt"))  # the frozen rank could not report
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r] == list(range(1, steps + 1))
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["step"]) == ("finished", steps)
