"""Checkpoints written by an earlier clipscale (tests/data/legacy/, made at 60ee967 by
tests/data/make_legacy_checkpoints.py) still resume, export and evaluate with today's code."""

import json
import shutil
from pathlib import Path

import pytest

from clipscale.metrics import read_jsonl

from helpers import cli_here, make_shards
from process_helpers import ENV

DATA = Path(__file__).parent / "data"
LEGACY_RUN = [
    "model.name=clip-fixture",
    f"model.config_dirs=[{DATA / 'models'}]",
    "model.precision=fp32",
    "train.device=cpu",
    "data.batch_size=4",
    "data.workers=0",
    "logging.progress=false",
    "logging.every_n_steps=1",
    "checkpoint.every_n_steps=1000",
]
ENGINE = {
    "ddp": ["engine.name=ddp"],
    "fsdp2": ["engine.name=fsdp2"],
    "zero2": ["engine.name=deepspeed", "engine.zero_stage=2"],
}


@pytest.fixture(scope="module")
def legacy_shards(tmp_path_factory):
    """The shards the legacy runs trained on (the same names and counts: their data position applies)."""
    return make_shards(tmp_path_factory.mktemp("legacy-shards"), n_shards=2, per_shard=8, size=16)


def legacy_run(tmp_path, fmt) -> Path:
    run_dir = tmp_path / fmt
    shutil.copytree(DATA / "legacy" / fmt, run_dir / "checkpoints")
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("fmt, nproc", [("ddp", 1), ("fsdp2", 1), ("zero2", 2)])
def test_a_legacy_checkpoint_resumes_where_it_stopped(tmp_path, legacy_shards, fmt, nproc):
    import subprocess
    import sys

    run_dir = legacy_run(tmp_path, fmt)
    launcher = ["-m", "clipscale.launch", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "clipscale.train", f"run.dir={run_dir}",
           f"data.train_shards={legacy_shards}", *LEGACY_RUN, *ENGINE[fmt], "train.steps=4",
           "checkpoint.resume=auto"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 2" in proc.stderr, proc.stderr[-3000:]
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == [3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["ddp", "fsdp2", "zero2"])
def test_a_legacy_checkpoint_exports_for_open_clip_and_evaluates(tmp_path, legacy_shards, fmt):
    import open_clip
    import torch

    from clipscale.model import register_model_configs

    run_dir = legacy_run(tmp_path, fmt)
    out = cli_here("export", "--checkpoint", str(run_dir), "--output", str(tmp_path / "model.pt")).stdout
    assert "step 2" in out
    open_clip.add_model_config(DATA / "models")
    register_model_configs()
    model = open_clip.create_model_and_transforms("clip-fixture", pretrained=str(tmp_path / "model.pt"))[0]
    assert model.logit_scale.dim() == 0 and torch.isfinite(model.logit_scale)
    first = legacy_shards.replace("{000000..000001}", "000000")
    cli_here("eval", "--checkpoint", str(run_dir), "--retrieval", first, "--workers", "0",
            "--config-dir", str(DATA / "models"), "--output", str(tmp_path / "eval.json"))  # fmt: skip
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["step"] == 2 and record["eval/retrieval_images"] == 8
