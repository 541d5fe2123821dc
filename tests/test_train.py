"""End-to-end single-process training, checkpoints and resume."""

import open_clip
import pytest
import torch

from clipscale.checkpoint import CheckpointManager
from clipscale.job.distributed import DistEnv
from clipscale.metrics import read_jsonl, read_sample_keys
from clipscale.model import BUNDLED_CONFIGS
from clipscale.train import Trainer, train

from helpers import tiny_config


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}


def test_short_run_loss_falls_and_writes_run_files(tmp_path, toy_shards):
    run = tmp_path / "run"
    cfg = tiny_config(run, toy_shards, train__steps=40, optim__lr=2e-3, schedule__warmup_steps=5)
    summary = train(cfg)
    assert summary["step"] == 40
    curve = losses(run)
    first = sum(curve[s] for s in (1, 2, 3)) / 3
    last = sum(curve[s] for s in (38, 39, 40)) / 3
    assert last < 0.6 * first, (first, last)
    record = read_jsonl(run / "metrics.jsonl")[-1]
    for key in ("step", "loss", "lr", "samples_per_s", "logit_scale", "data_wait", "epoch"):
        assert key in record
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000040.pt"


def test_resume_continues_at_the_right_step_with_identical_state(tmp_path, toy_shards):
    common = {
        "train__steps": 6,
        "checkpoint__every_n_steps": 3,
        "checkpoint__keep_last": 0,
        "data__workers": 2,
        "data__batch_size": 8,
    }
    full, part = tmp_path / "full", tmp_path / "part"
    train(tiny_config(full, toy_shards, **common))
    step3 = full / "checkpoints" / "step_00000003.pt"
    saved = torch.load(step3, weights_only=True)
    cfg = tiny_config(part, toy_shards, **common, checkpoint__resume=str(step3))
    env = DistEnv(0, 1, 0, torch.device("cpu"), None, "none")
    with Trainer(cfg, env) as trainer:
        assert trainer.step == 3
        live = trainer.engine.full_optimizer_state()  # parameter name -> exp_avg, exp_avg_sq, step
        assert live.keys() == saved["optimizer"]["state"].keys() and len(live) > 50
        for name, st in saved["optimizer"]["state"].items():
            for k, v in st.items():
                assert torch.equal(live[name][k], v), (name, k)
        assert trainer.engine.scheduler.last_epoch == 3
        trainer.fit()
    a, b = losses(full), losses(part)
    assert sorted(b) == [4, 5, 6]
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]  # exact continuation
    assert CheckpointManager(part, is_main=False).latest().name == "step_00000006.pt"
    # auto-resume of a finished run trains nothing more and keeps the final step
    assert train(tiny_config(part, toy_shards, **common, checkpoint__resume="auto"))["step"] == 6


def test_checkpoint_loads_in_open_clip(tmp_path, toy_shards):
    run = tmp_path / "run"
    train(tiny_config(run, toy_shards, train__steps=2))
    path = run / "checkpoints" / "step_00000002.pt"
    open_clip.add_model_config(BUNDLED_CONFIGS)
    model, _, preprocess = open_clip.create_model_and_transforms("clip-tiny", pretrained=str(path))
    saved = torch.load(path, weights_only=True)["state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_resume_from_another_model_fails_clearly(tmp_path, toy_shards):
    from clipscale.errors import CheckpointError

    run = tmp_path / "run"
    train(tiny_config(run, toy_shards, train__steps=1))
    cfg = tiny_config(run, toy_shards, train__steps=2, checkpoint__resume="auto", model__name="clip-small")
    with pytest.raises(CheckpointError, match="does not fit this model"):
        train(cfg)


def test_sample_keys_file(tmp_path, toy_shards):
    run = tmp_path / "run"
    train(tiny_config(run, toy_shards, train__steps=3, logging__sample_keys="true", data__batch_size=8))
    lines = read_sample_keys(run)
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert all(x["rank"] == 0 and len(x["keys"]) == 8 for x in lines)


def test_module_entry_point_and_tensorboard(tmp_path, toy_shards):
    import subprocess
    import sys

    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "clipscale.train",
        f"run.dir={run}",
        f"data.train_shards={toy_shards}",
        "train.steps=2",
        "data.batch_size=8",
        "data.workers=0",
        "logging.tensorboard=true",
        "logging.every_n_steps=1",
        "logging.progress=false",
        "train.device=cpu",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    # where the start-up went: the whole counts from the trainer's start, so it holds the model and data set-up
    import re

    took = re.search(r"start-up: ([\d.]+) s .*\(model ([\d.]+) s, data ([\d.]+) s", proc.stderr)
    assert took and float(took[1]) >= float(took[2]) + float(took[3]), proc.stderr[-2000:]
