"""Two torchrun "nodes" on this machine (--nnodes=2, c10d rendezvous on 127.0.0.1), as
slurm/train.sbatch starts them on a real cluster: one agent per node, ranks dealt by rendezvous."""

import os
import signal
import socket
import subprocess
import sys

import psutil
import pytest

from clipscale.checkpoint import CheckpointManager, load_checkpoint_file
from clipscale.metrics import read_jsonl

from process_helpers import COMMON, ENV, STEPS, keys, logged_steps, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from helpers import make_shards

    return make_shards(tmp_path_factory.mktemp("multinode_shards"), n_shards=8, per_shard=16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(run_dir, shards, *overrides, max_restarts=0):
    port = free_port()
    env = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # as slurm/train.sbatch exports it
    nodes = []
    for node_rank in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "clipscale.launch",
            "--nnodes=2",
            "--nproc-per-node=1",
            f"--node-rank={node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=clipscale-test",
            f"--max-restarts={max_restarts}",
            "--monitor-interval=0.5",
            "-m",
            "clipscale.train",
            f"run.dir={run_dir}",
            f"data.train_shards={shards}",
            *COMMON,
            *overrides,
        ]
        nodes.append(
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
            )
        )
    return nodes


def finish(nodes):
    outputs = []
    for node in nodes:
        try:
            outputs.append(node.communicate(timeout=400)[0])
        finally:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    return outputs


def test_two_torchrun_nodes_share_one_world(tmp_path, shards):
    run_dir = tmp_path / "run"
    nodes = start_nodes(run_dir, shards)
    outputs = finish(nodes)
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    status = read_jsonl_status(run_dir)
    assert (status["state"], status["step"], status["world_size"]) == ("finished", STEPS, 2)
    # each node ran one worker; together they are ranks 0 and 1 of one world of 2
    assert sum("[rank0] INFO model clip-tiny" in o for o in outputs) == 1
    assert all("2 process(es) on cpu" in o for o in outputs if "[rank0] INFO" in o)
    k = keys(run_dir)
    assert sorted(k) == [(s, r) for s in range(1, STEPS + 1) for r in (0, 1)]
    assert all(len(set(k[(s, 0)]) & set(k[(s, 1)])) == 0 for s in range(1, STEPS + 1))  # disjoint halves
    saved = load_checkpoint_file(CheckpointManager(run_dir, is_main=False).latest())
    assert saved["train_state"]["meta"]["world_size"] == 2


def test_worker_killed_on_one_node_both_nodes_restart_and_resume(tmp_path, shards):
    """--max-restarts across nodes: the dead worker's node and the survivor's node start a new
    rendezvous round and the run resumes from its latest checkpoint (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    gives the round a fresh store, pytorch/pytorch#135712)."""
    run_dir = tmp_path / "run"
    nodes = start_nodes(run_dir, shards, "checkpoint.resume=auto", max_restarts=1)
    wait_for(lambda: logged_steps(run_dir) >= 5, nodes[0])
    workers = [p for p in psutil.Process(nodes[1].pid).children() if "clipscale.train" in " ".join(p.cmdline())]
    assert len(workers) == 1
    workers[0].kill()
    outputs = finish(nodes)
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    status = read_jsonl_status(run_dir)
    assert (status["state"], status["step"], status["world_size"]) == ("finished", STEPS, 2)
    # (torchrun counts restarts per node: the other node only re-joins, a membership change, so
    # status.json's restart_count is whatever the node of the new rank 0 counted)
    assert sum("INFO resumed from" in o for o in outputs) == 1
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, STEPS + 1))


def read_jsonl_status(run_dir):
    from clipscale.job.status import read_status

    status = read_status(run_dir)
    assert status is not None, f"no status.json in {run_dir}"
    return status
