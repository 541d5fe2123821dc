"""Training stages in one run (schedule.stages): patch dropout and lr scale that change at set steps, the
stage in metrics and status, exact resume before, at and after a boundary, and one-line errors for stage
lists that cannot run."""

from __future__ import annotations

import json

import pytest
import torch

from clipscale.config.layout import resolve_stages
from clipscale.errors import ConfigError
from clipscale.metrics import read_jsonl
from clipscale.train import train

from helpers import tiny_config

TWO = "[{until_step: 4, patch_dropout: 0.5}, {patch_dropout: 0.0, lr_scale: 0.5}]"


@pytest.mark.parametrize(
    "stages, message",
    [
        ("[{until_step: 4, image_size: 112}, {}]", "'schedule.stages[0].image_size': changing image_size within a run"),
        ("[{until_step: 4}, {until_step: 3}]", "'schedule.stages[1]' ends after step 3: boundaries must increase"),
        ("[{until_step: 40}, {}]", "'schedule.stages[0]' ends after step 40"),
        (
            "[{patch_dropout: 0.5}, {}]",
            "'schedule.stages[0]': a stage before the last needs until_step",
        ),
        ("[{until_step: 4, until_samples: 64}, {}]", "give until_step or until_samples, not both"),
        ("[{until_step: 4, patch_dropout: 1.0}, {}]", "patch_dropout must be in [0, 1) and lr_scale > 0"),
        ("[{until_step: 4}, {lr_scale: 0}]", "patch_dropout must be in [0, 1) and lr_scale > 0"),
        ("[{until_step: 4}, {until_step: 6}]", "let the last stage run to the end"),
        ("[{until_step: 4, batch_size: 64}, {}]", "changing batch_size within a run is not supported yet"),
    ],
)
def test_stage_lists_that_cannot_run_are_one_line_errors(tmp_path, stages, message):
    with pytest.raises(ConfigError) as caught:
        tiny_config(tmp_path, "x.tar", schedule__stages=stages)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_boundaries_in_samples_become_whole_global_batches_and_values_carry_over():
    from clipscale.config.schema import StageConfig

    stages = [StageConfig(until_samples=100, patch_dropout=0.5), StageConfig(until_step=10, lr_scale=0.1),
              StageConfig()]  # fmt: skip
    got = resolve_stages(stages, 0.0, global_batch=32, total_steps=20)
    assert [(s.ends_after, s.patch_dropout, s.lr_scale) for s in got] == [(4, 0.5, 1.0), (10, 0.5, 0.1), (20, 0.5, 0.1)]


def records(run):
    return [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


def test_a_two_stage_run_switches_at_the_boundary_and_reports_its_stage(tmp_path, toy_shards):
    staged, plain = tmp_path / "staged", tmp_path / "plain"
    train(tiny_config(staged, toy_shards, train__steps=8, schedule__stages=TWO, train__peak_tflops=0.1))
    train(tiny_config(plain, toy_shards, train__steps=8, train__peak_tflops=0.1))
    a, b = records(staged), records(plain)
    assert [r["stage"] for r in a] == [0] * 4 + [1] * 4
    assert [r["stage/patch_dropout"] for r in a] == [0.5] * 4 + [0.0] * 4
    for x, y in zip(a, b):  # the same schedule, times the stage's lr scale (a record's lr is the next step's)
        assert x["lr"] == pytest.approx(y["lr"] * (0.5 if x["step"] + 1 > 4 else 1.0), rel=1e-9)
    # half the image tokens in stage 0: fewer model FLOPs per sample there, all of them in stage 1
    per_sample = [r["tflops"] / r["samples_per_s"] for r in a]
    assert per_sample[0] < 0.9 * per_sample[-1] and per_sample[-1] == pytest.approx(
        b[-1]["tflops"] / b[-1]["samples_per_s"]
    )
    status = json.loads((staged / "status.json").read_text())
    assert status["stage"] == {"index": 1, "of": 2, "patch_dropout": 0.0, "lr_scale": 0.5, "ends_after": 8}
    assert status["next_boundary"] is None


@pytest.mark.parametrize("resume_at", [3, 4, 5])  # before, at and after the boundary (after step 4)
def test_resuming_before_at_and_after_a_boundary_is_bitwise(tmp_path, toy_shards, resume_at, full_staged_run):
    part = tmp_path / f"from-{resume_at}"
    checkpoint = full_staged_run / "checkpoints" / f"step_{resume_at:08d}.pt"
    train(tiny_config(part, toy_shards, train__steps=8, schedule__stages=TWO, checkpoint__every_n_steps=1,
                      checkpoint__keep_last=0, checkpoint__resume=str(checkpoint)))  # fmt: skip
    full = {r["step"]: r["loss"] for r in records(full_staged_run)}
    resumed = {r["step"]: r["loss"] for r in records(part)}
    assert sorted(resumed) == list(range(resume_at + 1, 9))
    assert all(resumed[s] == full[s] for s in resumed)  # bitwise
    a = torch.load(full_staged_run / "checkpoints" / "step_00000008.pt", weights_only=False)["state_dict"]
    b = torch.load(part / "checkpoints" / "step_00000008.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def full_staged_run(module_tmp, toy_shards):
    run = module_tmp("full-staged")
    train(tiny_config(run, toy_shards, train__steps=8, schedule__stages=TWO, checkpoint__every_n_steps=1,
                      checkpoint__keep_last=0))  # fmt: skip
    return run
