"""DeepSpeed engine: ZeRO 0-3 against DDP, kill/resume, export, bad settings (2 processes, gloo, CPU)."""

import json
import subprocess
import sys

import pytest
import torch

from clipscale.config import load_config
from clipscale.errors import ConfigError
from clipscale.metrics import read_jsonl

from helpers import cli_here, run_cli
from process_helpers import COMMON, CURVE, CURVE_STEPS, ENV, kill_and_resume, losses, run


@pytest.fixture(scope="module")
def shards(curve_shards):
    return curve_shards


def assert_tracks(ddp: dict, ds: dict) -> None:
    assert sorted(ds) == list(range(1, CURVE_STEPS + 1))
    assert abs(ds[1] - ddp[1]) <= 1e-5, (ds[1], ddp[1])
    worst = max(abs(ds[s] - ddp[s]) for s in ds)
    assert worst <= 1e-3, worst


def zero(stage: int) -> list[str]:
    return [*CURVE, "engine.name=deepspeed", f"engine.zero_stage={stage}"]


@pytest.fixture(scope="module")
def zero_runs(module_tmp, shards):
    """zero_runs(stage): the folder of one uninterrupted 2-rank CURVE run at that ZeRO stage, made once:
    the curve compared with DDP's, the reference of the kill-and-resume test, the checkpoint exported.
    Tests copy what they write into."""
    made = {}

    def get(stage: int):
        if stage not in made:
            made[stage] = module_tmp(f"zero{stage}")
            run(2, made[stage], shards, *zero(stage))
        return made[stage]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_tracks_ddp(zero_runs, ddp_curves, stage):
    run_dir = zero_runs(stage)
    assert_tracks(ddp_curves["plain"], losses(run_dir))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{CURVE_STEPS:08d}"


@pytest.mark.slow
def test_zero3_feature_cache_accumulation_and_grad_checkpointing_track_ddp(tmp_path, shards, ddp_curves):
    run(
        2,
        tmp_path,
        shards,
        *CURVE,
        "engine.name=deepspeed",
        "engine.zero_stage=3",
        "optim.accum_steps=2",
        "model.grad_checkpointing=true",
    )
    assert_tracks(ddp_curves["accum"], losses(tmp_path))
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["global_batch"] == 8 * 2 * 2


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_kill_and_resume_is_identical(tmp_path, shards, zero_runs, stage):
    kill_and_resume(2, tmp_path, shards, *zero(stage), seed=stage, full=zero_runs(stage))


LIVE_EMBEDDINGS = """
import sys, torch
from clipscale.config import load_config
from clipscale.job.distributed import init_distributed
from clipscale.train import Trainer
cfg = load_config(None, sys.argv[2:])
trainer = Trainer(cfg, init_distributed("cpu"))  # resumes the ZeRO-3 checkpoint: partitioned weights
torch.manual_seed(123)
images = torch.rand(4, 3, 32, 32)
trainer.engine.module.eval()
with torch.no_grad():
    features = trainer.engine.forward(images, trainer.bundle.tokenizer(["a digit"] * 4))["image_features"]
if trainer.env.rank == 0:
    torch.save({"images": images, "features": features}, sys.argv[1])
"""


@pytest.mark.slow
def test_export_of_a_zero3_checkpoint_loads_in_open_clip_with_the_same_embeddings(tmp_path, shards, zero_runs):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(zero_runs(3), run_dir)  # a ZeRO-3 run of 2 ranks, its last checkpoint at step 20
    script = tmp_path / "live.py"
    script.write_text(LIVE_EMBEDDINGS)
    live = tmp_path / "live.pt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(live),
            f"run.dir={run_dir}",
            f"data.train_shards={shards}",
            *COMMON,
            *zero(3),
            "checkpoint.resume=auto",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = cli_here("export", "--checkpoint", str(run_dir), "--output", str(tmp_path / "model.pt"))
    assert "create_model_and_transforms('clip-tiny'" in out.stdout
    import open_clip

    from clipscale.model import register_model_configs

    register_model_configs()
    model, _, _ = open_clip.create_model_and_transforms("clip-tiny", pretrained=str(tmp_path / "model.pt"))
    model.eval()
    expected = torch.load(live)
    with torch.no_grad():
        got = model.encode_image(expected["images"], normalize=True)
    assert torch.allclose(got, expected["features"], atol=1e-5), (got - expected["features"]).abs().max()


# ---------------------------------------------------------------- settings (no processes)


def build_ds_config(cfg, world_size, device, user=None):
    """The DeepSpeed config the engine builds for `cfg` at `world_size` ranks."""
    from clipscale.config import BatchLayout
    from clipscale.engine.base import EngineSpec
    from clipscale.engine.ds_config import build_ds_config as build

    return build(EngineSpec.of(cfg, BatchLayout.of(cfg.data, cfg.optim, world_size)), device, user=user)


def ds_cfg(**overrides):
    items = ["engine.name=deepspeed", "data.batch_size=16", "optim.accum_steps=2", "data.train_shards=x.tar"]
    items += [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    return load_config(None, items)


def test_generated_config_follows_clipscale():
    ds = build_ds_config(
        ds_cfg(optim__lr=3e-4),
        world_size=4,
        device=torch.device("cpu"),
        user={"zero_optimization": {"stage": 3, "overlap_comm": True}},
    )
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 * 2 * 4
    assert ds["optimizer"]["params"]["lr"] == 3e-4 and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}


@pytest.mark.parametrize(
    "user, message",
    [
        (
            {"zero_optimisation": {"stage": 2}},
            "unknown DeepSpeed setting 'zero_optimisation' (did you mean 'zero_optimization'?)",
        ),
        (
            {"train_micro_batch_size_per_gpu": 8},
            "train_micro_batch_size_per_gpu=8, which clipscale derives from data.batch_size (= 16)",
        ),
        ({"optimizer": {"type": "Adam"}}, "derives from optim.*"),
        ({"scheduler": {"type": "WarmupLR"}}, "derives from schedule.*"),
        ({"bf16": {"enabled": True}}, "bf16.enabled=true, which contradicts model.precision=fp32"),
        ({"zero_optimization": {"stage": 3, "overlap_comms": True}}, "zero_optimization.overlap_comms"),
    ],
)
def test_bad_settings_fail_with_one_line(user, message):
    with pytest.raises(ConfigError) as err:
        build_ds_config(ds_cfg(model__precision="fp32"), 2, torch.device("cpu"), user=user)
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError) as err:  # and already when the config is loaded, before anything runs
        ds_cfg(model__precision="fp32", engine__deepspeed_config=json.dumps(user))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_global_batch_that_contradicts_the_world_size_is_found_when_the_engine_starts():
    cfg = ds_cfg(engine__deepspeed_config=json.dumps({"train_batch_size": 64}))  # 16 x 2 accum x 2 ranks: fits
    assert build_ds_config(cfg, 2, torch.device("cpu"))["train_batch_size"] == 64
    with pytest.raises(ConfigError, match="train_batch_size=64, which clipscale derives from"):
        build_ds_config(cfg, 4, torch.device("cpu"))


def test_stage_conflict_between_key_and_file():
    with pytest.raises(
        ConfigError, match="engine.zero_stage=2 but engine.deepspeed_config sets zero_optimization.stage=3"
    ):
        build_ds_config(ds_cfg(engine__zero_stage=2), 2, torch.device("cpu"), user={"zero_optimization": {"stage": 3}})
    cfg = ds_cfg(engine__deepspeed_config="configs/deepspeed/zero3.yaml")
    assert build_ds_config(cfg, 2, torch.device("cpu"))["zero_optimization"]["stage"] == 3


def test_bad_settings_stop_the_cli_at_start_up(tmp_path, toy_shards):
    proc = run_cli(
        "train",
        f"run.dir={tmp_path}",
        f"data.train_shards={toy_shards}",
        "train.device=cpu",
        "engine.name=deepspeed",
        "engine.deepspeed_config={train_micro_batch_size_per_gpu: 3}",
        check=False,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("clipscale: error:")]
    assert len(errors) == 1 and "train_micro_batch_size_per_gpu=3" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("stage", [0, 2])
def test_non_finite_step_is_skipped_and_weights_untouched(tmp_path, toy_shards, stage):
    from test_resume import NaNOnCalls

    from clipscale.job.distributed import DistEnv, cleanup
    from clipscale.train import Trainer

    from helpers import tiny_config

    env = DistEnv(0, 1, 0, torch.device("cpu"), None, "none")
    cfg = tiny_config(tmp_path, toy_shards, train__steps=1, engine__name="deepspeed", engine__zero_stage=stage)
    try:
        with Trainer(cfg, env) as trainer:
            trainer.fit()
            before = {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}
            trainer.loss_fn = NaNOnCalls(trainer.loss_fn, {1})
            trainer.cfg.train.steps = 2
            trainer.fit()
            assert trainer.progress.nonfinite_total == 1
            for k, v in trainer.engine.module.state_dict().items():
                assert torch.equal(v, before[k]), k
    finally:
        cleanup()
