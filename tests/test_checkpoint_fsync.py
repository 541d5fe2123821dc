"""Checkpoints on cluster file systems: each rank fsyncs only the files it wrote, the main rank each
directory once; O(world) fsyncs per checkpoint, not world x files (issue 28)."""

import os
from collections import Counter
from pathlib import Path

import torch.multiprocessing as mp

from clipscale.checkpoint.files import durability_shares

LEGACY = Path(__file__).parent / "data" / "legacy"


def test_deepspeed_files_go_to_their_writer_and_directories_to_the_main_rank():
    folder = LEGACY / "zero2" / "step_00000002"  # written by DeepSpeed ZeRO-2 at 2 ranks
    shares = durability_shares(folder, world=2)
    assert shares[1] == ["state/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert "state/zero_pp_rank_0_mp_rank_00_optim_states.pt" in shares[0]
    assert "state/mp_rank_00_model_states.pt" in shares[0] and "ds_config.json" in shares[0]
    every = [p for share in shares for p in share]
    files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    assert sorted(every) == sorted(files + ["state", "."])  # each file and directory exactly once
    assert shares[0][-2:] == ["state", "."]  # directories after what they hold, deepest first


def test_a_writer_that_synced_its_files_leaves_only_the_directories():
    shares = durability_shares(LEGACY / "fsdp2" / "step_00000002", world=3, files_synced=True)
    assert shares == [["."], [], []]


def _save_as_rank(rank, world, run_dir, port, counts):
    import torch.distributed as dist

    from clipscale.checkpoint.manager import CheckpointManager

    synced = Counter()
    real_fsync = os.fsync

    def counting_fsync(fd):  # the system-call boundary: which paths this process fsyncs
        synced[os.readlink(f"/proc/self/fd/{fd}")] += 1
        real_fsync(fd)

    os.fsync = counting_fsync
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        manager = CheckpointManager(run_dir, is_main=rank == 0)

        def write(tmp: Path):  # as DeepSpeed does: every rank its optimizer shard, rank 0 the model
            if rank == 0:
                (tmp / "state").mkdir(parents=True)
            dist.barrier()
            (tmp / "state" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x" * 100)
            if rank == 0:
                (tmp / "state" / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)

        manager.save(5, write, suffix="")
        counts[rank] = dict(synced)
    finally:
        dist.destroy_process_group()


def test_a_two_rank_save_fsyncs_each_file_once_by_its_writer(tmp_path):
    from rank_launcher import free_port

    with mp.Manager() as manager:
        counts = manager.dict()
        mp.spawn(_save_as_rank, args=(2, tmp_path, free_port(), counts), nprocs=2)
        counts = dict(counts)
    final = tmp_path / "checkpoints" / "step_00000005"
    assert (final / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    rank1 = {os.path.basename(p) for p in counts[1]}
    assert rank1 == {"zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    rank0 = Counter({os.path.basename(p.removesuffix(".tmp")): n for p, n in counts[0].items()})
    assert rank0["zero_pp_rank_1_mp_rank_00_optim_states.pt"] == 0
    assert rank0["zero_pp_rank_0_mp_rank_00_optim_states.pt"] == 1
    assert rank0["mp_rank_00_model_states.pt"] == 1
    # 3 files + 2 new directories + the checksum file, `latest` and their folder's entries
    assert sum(counts[0].values()) + sum(counts[1].values()) <= 3 + 2 + 6
