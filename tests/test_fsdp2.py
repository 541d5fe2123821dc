"""FSDP2 against DDP, exact resume, and resuming at another world size on every engine with the
optimizer moments carried over (gloo, CPU, real processes)."""

import shutil

import pytest
import torch

from clipscale.metrics import read_jsonl, read_sample_keys

from distributed_helpers import run_distributed
from process_helpers import COMMON, CURVE, CURVE_ACCUM, CURVE_STEPS, kill_and_resume, losses, run

ENGINES = {
    "ddp": ["engine.name=ddp"],
    "fsdp2": ["engine.name=fsdp2"],
    "zero2": ["engine.name=deepspeed", "engine.zero_stage=2"],
    "zero3": ["engine.name=deepspeed", "engine.zero_stage=3"],
}


@pytest.fixture(scope="module")
def shards(curve_shards):
    return curve_shards


@pytest.fixture(scope="module")
def fsdp2_curves(module_tmp, shards):
    """fsdp2_curves(curve): the folder of one uninterrupted 2-rank FSDP2 CURVE run (plain, or with
    accumulation and gradient checkpointing), made once: compared with DDP's, and the reference of
    the kill-and-resume test."""
    made = {}

    def get(curve: str):
        if curve not in made:
            made[curve] = module_tmp(f"fsdp2-{curve}")
            run(2, made[curve], shards, *CURVE, *(CURVE_ACCUM if curve == "accum" else []), "engine.name=fsdp2")
        return made[curve]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("curve", ["plain", "accum"])
def test_fsdp2_losses_equal_ddp(fsdp2_curves, ddp_curves, curve):
    ddp, fsdp = ddp_curves[curve], losses(fsdp2_curves(curve))
    assert sorted(fsdp) == list(range(1, CURVE_STEPS + 1))
    worst = max(abs(fsdp[s] - ddp[s]) for s in fsdp)
    assert worst <= 1e-5, worst


@pytest.mark.slow
def test_fsdp2_kill_and_resume_is_bitwise(tmp_path, shards, fsdp2_curves):
    kill_and_resume(2, tmp_path, shards, *CURVE, "engine.name=fsdp2", seed=7, full=fsdp2_curves("plain"))


@pytest.mark.slow
def test_fsdp2_evaluates_like_ddp_and_exports_for_open_clip(tmp_path, shards):
    import open_clip

    from clipscale.model import register_model_configs

    from helpers import cli_here

    first = shards.replace("{000000..000007}", "000000")
    for engine in ("ddp", "fsdp2"):
        run(
            2,
            tmp_path / engine,
            shards,
            f"engine.name={engine}",
            "train.steps=3",
            f"eval.retrieval={first}",
            "data.workers=0",
        )
    ddp, fsdp = (read_jsonl(tmp_path / e / "metrics.jsonl")[-1] for e in ("ddp", "fsdp2"))
    assert fsdp["eval/retrieval_images"] == 16
    for key in ("eval/i2t_r1", "eval/t2i_r5", "eval/i2t_r10"):
        assert fsdp[key] == ddp[key], key
    cli_here("export", "--checkpoint", str(tmp_path / "fsdp2"), "--output", str(tmp_path / "model.pt"))
    register_model_configs()
    model = open_clip.create_model_and_transforms("clip-tiny", pretrained=str(tmp_path / "model.pt"))[0]
    assert model.logit_scale.dim() == 0


# --------------------------------------------------------------------------- another world size

RESUME_STEPS = 6  # the first run saves at step 3 (128 samples = 4 steps of 32: mid-epoch)
SAVED_RUN = ["train.steps=3", "data.batch_size=16", "data.workers=1", "checkpoint.every_n_steps=3",
             "logging.sample_keys=true"]  # fmt: skip


def _train_and_read_moments(rank, world, run_dir, shards, overrides):
    """A run of `overrides` to its end (it saves its last step); then, in the same processes, the AdamW
    moments its checkpoint holds, read back at the world size that wrote it."""
    import os

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # DeepSpeed insists
    from clipscale.config import load_config
    from clipscale.job.distributed import init_distributed
    from clipscale.train import Trainer

    items = [f"run.dir={run_dir}", f"data.train_shards={shards}", *COMMON, *overrides]
    env = init_distributed("cpu", 600)
    with Trainer(load_config(None, items), env) as trainer:
        trainer.fit()
    with Trainer(load_config(None, [*items, "checkpoint.resume=auto"]), env) as trainer:
        moments = trainer.engine.full_optimizer_state()
    return moments if rank == 0 else None


@pytest.fixture(scope="module")
def saved_runs(module_tmp, shards):
    """One 2-rank run per engine, stopped after step 3 (checkpoint at 3), and the moments it saved
    (read in the run itself: one launch per engine, not two)."""
    root = module_tmp("saved")
    out = {}
    for name, args in ENGINES.items():
        moments = run_distributed(_train_and_read_moments, 2, root / name, shards, [*args, *SAVED_RUN], timeout=600)
        out[name] = (root / name, moments[0])
    return out


def _resume_and_train(rank, world, run_dir, shards, overrides):
    """The command a requeued job runs, at this world size, in one launch: the moments right after
    the resume (what the checkpoint carried over), then the rest of the run."""
    import os

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # DeepSpeed insists
    from clipscale.config import load_config
    from clipscale.job.distributed import init_distributed
    from clipscale.train import Trainer

    cfg = load_config(None, [f"run.dir={run_dir}", f"data.train_shards={shards}", *COMMON, *overrides])
    with Trainer(cfg, init_distributed("cpu", 600)) as trainer:
        moments = {name: {k: torch.as_tensor(v).clone() for k, v in state.items()}
                   for name, state in trainer.engine.full_optimizer_state().items()}  # fmt: skip
        trainer.fit()  # (steps the live moments in place)
    return moments if rank == 0 else None


@pytest.mark.slow
@pytest.mark.parametrize(
    "source, target, world",
    [
        ("fsdp2", "fsdp2", 1),
        ("fsdp2", "fsdp2", 3),
        ("zero2", "zero2", 1),
        ("zero2", "zero2", 3),
        ("zero3", "zero3", 1),
        ("zero3", "zero3", 3),
        ("ddp", "fsdp2", 1),
        ("ddp", "fsdp2", 3),
        ("fsdp2", "ddp", 3),
        ("ddp", "ddp", 3),
    ],
)
def test_resume_at_another_world_size_carries_moments_and_data(tmp_path, saved_runs, shards, source, target, world):
    saved, reference = saved_runs[source]
    run_dir = tmp_path / "run"
    shutil.copytree(saved, run_dir)
    overrides = [*ENGINES[target], f"train.steps={RESUME_STEPS}", *SAVED_RUN[1:], "checkpoint.resume=auto"]
    resumed = run_distributed(_resume_and_train, world, run_dir, shards, overrides, timeout=600)[0]
    assert resumed.keys() == reference.keys() and len(reference) > 50
    for name, state in reference.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(resumed[name][key].reshape(-1), state[key].reshape(-1)), (name, key)
    # and the run continued there, with every sample of the started epoch once
    records = read_sample_keys(run_dir)
    assert sorted({r["step"] for r in records}) == list(range(1, RESUME_STEPS + 1))
    epoch0 = [k for r in records for k, p in zip(r["keys"], r["passes"]) if p == 0]
    assert len(epoch0) == len(set(epoch0)) == 128  # 8 shards x 16: every sample of epoch 0, once
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["step"] == RESUME_STEPS
