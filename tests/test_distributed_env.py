import pytest

from clipscale.job.distributed import DistributedEnvError, detect_launch, expand_hostlist


def test_no_launcher_is_one_process():
    info = detect_launch({})
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("none", 0, 1, 0)


def test_torchrun_variables():
    info = detect_launch(
        {
            "RANK": "5",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "n1",
            "MASTER_PORT": "29500",
            "TORCHELASTIC_RESTART_COUNT": "2",
        }
    )
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("torchrun", 5, 8, 1)
    assert info.restart_count == 2


def test_torchrun_wins_inside_slurm():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert detect_launch(env).launcher == "torchrun"


def test_slurm_srun_variables_and_master_from_nodelist():
    env = {
        "SLURM_PROCID": "9",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[007-008,010],login2",
        "SLURM_JOB_ID": "4242",
    }
    info = detect_launch(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("slurm", 9, 16, 1)
    assert info.master_addr == "gpu007"
    assert info.master_port == 20000 + 4242


def test_single_task_slurm_job_is_one_process():
    assert detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "none"


def test_hostlist_expansion():
    assert expand_hostlist("gpu[01-03,07],login1,n[9-10]x") == [
        "gpu01",
        "gpu02",
        "gpu03",
        "gpu07",
        "login1",
        "n9x",
        "n10x",
    ]
    assert expand_hostlist("single") == ["single"]


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "0"}, "RANK and WORLD_SIZE must be set together; missing WORLD_SIZE"),
        ({"RANK": "4", "WORLD_SIZE": "4"}, "rank 4 is outside world size 4"),
        ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK='x' is not an integer"),
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}, "local rank 3 is inconsistent with rank 1"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "no SLURM_JOB_NODELIST or MASTER_ADDR"),
    ],
)
def test_inconsistent_environments_fail_clearly(env, message):
    with pytest.raises(DistributedEnvError, match=message):
        detect_launch(env)


def test_slurm_requeues_and_torchrun_restarts_are_counted_apart():
    """Inside a requeued sbatch job torchrun sets TORCHELASTIC_RESTART_COUNT=0: the requeue count
    must still come through (log prefixes, status.json)."""
    info = detect_launch(
        {
            "RANK": "0",
            "WORLD_SIZE": "2",
            "TORCHELASTIC_RESTART_COUNT": "0",
            "SLURM_RESTART_COUNT": "3",
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "1",
        }
    )
    assert (info.restart_count, info.requeue_count) == (0, 3)
    info = detect_launch(
        {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1", "SLURM_RESTART_COUNT": "1"}
    )
    assert (info.launcher, info.restart_count, info.requeue_count) == ("slurm", 0, 1)
    with pytest.raises(DistributedEnvError, match="SLURM_RESTART_COUNT"):
        detect_launch({"SLURM_RESTART_COUNT": "x"})
