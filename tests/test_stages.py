"""Training stages in one run (schedule.stages): patch dropout and lr scale that change at set steps, the
stage in metrics and status, exact resume before, at and after a boundary, and one-line errors for stage
lists that cannot run."""

from __future__ import annotations

import collections
import json

import pytest
import torch
from PIL import Image

from clipscale.config.layout import resolve_stages
from clipscale.errors import ConfigError
from clipscale.metrics import read_jsonl, read_sample_keys
from clipscale.train import train

from helpers import tiny_config

# CLIPA and FLIP in one: small images, short texts, a big batch and half the patches for 4 steps, then the
# model's own 32 px and 32 tokens at a smaller batch, unmasked, at half the learning rate
TWO = ("[{until_step: 4, patch_dropout: 0.5, image_size: 16, context_length: 8, batch_size: 32},"
       " {patch_dropout: 0.0, lr_scale: 0.5, image_size: 32, context_length: 32, batch_size: 16}]")  # fmt: skip


@pytest.mark.parametrize(
    "stages, message, more",
    [
        ("[{until_step: 4}, {until_step: 3}]", "'schedule.stages[1]' ends after step 3: boundaries must increase", {}),
        ("[{until_step: 40}, {}]", "'schedule.stages[0]' ends after step 40", {}),
        ("[{patch_dropout: 0.5}, {}]", "'schedule.stages[0]': a stage before the last needs until_step", {}),
        ("[{until_step: 4, until_samples: 64}, {}]", "give until_step or until_samples, not both", {}),
        ("[{until_step: 4, patch_dropout: 1.0}, {}]", "patch_dropout must be in [0, 1) and lr_scale > 0", {}),
        ("[{until_step: 4}, {lr_scale: 0}]", "patch_dropout must be in [0, 1) and lr_scale > 0", {}),
        ("[{until_step: 4}, {until_step: 6}]", "let the last stage run to the end", {}),
        (
            "[{until_step: 4, image_size: 20}, {}]",
            "'schedule.stages[0].image_size'=20 is not a multiple of clip-tiny's patch size 8",
            {},
        ),  # fmt: skip
        ("[{until_step: 4, batch_size: 0}, {}]", "'schedule.stages[0].batch_size' must be a positive number", {}),
        (
            "[{until_step: 4, batch_size: 30}, {}]",
            "'schedule.stages[0]': a global batch of 30 does not split into the 4 micro-batches",
            {"optim__accum_steps": 4},
        ),  # fmt: skip
        (
            "[{until_step: 4}, {context_length: 16}]",
            "'schedule.stages[1]': image_size and context_length stages run on engine ddp",
            {"engine__name": "fsdp2"},
        ),  # fmt: skip
        (
            "[{until_step: 4, batch_size: 32}, {}]",
            "'schedule.stages[0].batch_size': batch size stages run on engines ddp and fsdp2",
            {"engine__name": "deepspeed", "engine__zero_stage": 2},
        ),  # fmt: skip
        ("[{until_step: 4, image_size: 64}, {}]", "RN50 has no open_clip ViT image tower", {"model__name": "RN50"}),
    ],
)
def test_stage_lists_that_cannot_run_are_one_line_errors(tmp_path, stages, message, more):
    with pytest.raises(ConfigError) as caught:
        tiny_config(tmp_path, "x.tar", schedule__stages=stages, **more)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_stage_batch_the_world_size_does_not_divide_stops_at_start(tmp_path, toy_shards):
    from clipscale.config.layout import BatchLayout
    from clipscale.engine.base import training_stages

    cfg = tiny_config(tmp_path, toy_shards, schedule__stages="[{until_step: 4, batch_size: 40}, {}]")
    assert [s.global_batch for s in training_stages(cfg, BatchLayout(16, 1, 1, 1))] == [40, 40]  # carried over
    with pytest.raises(ConfigError, match="a global batch of 40 does not split into the 3 micro-batches of a step"):
        training_stages(cfg, BatchLayout(16, 3, 1, 1))  # 3 ranks: 48 a step, 40 cannot be dealt


def test_boundaries_in_samples_become_whole_global_batches_and_values_carry_over():
    from clipscale.config.schema import StageConfig

    stages = [StageConfig(until_samples=100, patch_dropout=0.5), StageConfig(until_step=10, lr_scale=0.1),
              StageConfig()]  # fmt: skip
    got = resolve_stages(stages, 0.0, global_batch=32, total_steps=20)
    assert [(s.ends_after, s.patch_dropout, s.lr_scale) for s in got] == [(4, 0.5, 1.0), (10, 0.5, 0.1), (20, 0.5, 0.1)]


def test_sample_boundaries_count_the_samples_of_every_stage_at_its_own_batch():
    from clipscale.config.schema import StageConfig

    stages = [
        StageConfig(until_samples=100, batch_size=32, image_size=112, context_length=32),
        StageConfig(until_samples=200, batch_size=16),
        StageConfig(image_size=224, context_length=77),
    ]
    got = resolve_stages(stages, 0.0, global_batch=64, total_steps=20, micro_batches=8)
    # 4 steps of 32 (128 samples), then (200 - 128) / 16 = 4.5 -> 5 steps of 16, then 16 a step to the end
    assert [(s.ends_after, s.global_batch, s.image_size, s.context_length) for s in got] == [
        (4, 32, 112, 32), (9, 16, 112, 32), (20, 16, 224, 77)]  # fmt: skip
    assert [s.samples_through(s.ends_after) for s in got] == [128, 128 + 80, 128 + 80 + 11 * 16]


def records(run):
    return [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


def test_a_two_stage_run_switches_at_the_boundary_and_reports_its_stage(tmp_path, toy_shards, full_staged_run):
    plain = tmp_path / "plain"
    train(tiny_config(plain, toy_shards, train__steps=8, train__peak_tflops=0.1))
    a, b = records(full_staged_run), records(plain)
    assert [r["stage"] for r in a] == [0] * 4 + [1] * 4
    assert [r["stage/patch_dropout"] for r in a] == [0.5] * 4 + [0.0] * 4
    assert [(r["stage/image_size"], r["stage/context_length"], r["global_batch"]) for r in a] == [
        (16, 8, 32)] * 4 + [(32, 32, 16)] * 4  # fmt: skip
    for x, y in zip(a, b):  # the same schedule, times the stage's lr scale (a record's lr is the next step's)
        assert x["lr"] == pytest.approx(y["lr"] * (0.5 if x["step"] + 1 > 4 else 1.0), rel=1e-9)
    # a quarter of the pixels, half of their patches and a quarter of the tokens in stage 0: far fewer model
    # FLOPs per sample there, all of them in stage 1
    per_sample = [r["tflops"] / r["samples_per_s"] for r in a]
    assert per_sample[0] < 0.5 * per_sample[-1] and per_sample[-1] == pytest.approx(
        b[-1]["tflops"] / b[-1]["samples_per_s"]
    )
    status = json.loads((full_staged_run / "status.json").read_text())
    assert status["stage"] == {"index": 1, "of": 2, "patch_dropout": 0.0, "lr_scale": 0.5, "global_batch": 16,
                               "image_size": 32, "context_length": 32, "ends_after": 8}  # fmt: skip
    assert status["next_boundary"] is None
    # every sample once per pass over the 64 toy samples: 4 x 32 + 4 x 16 = 192 = three whole passes
    lines = read_sample_keys(full_staged_run)
    assert [len(r["keys"]) for r in lines] == [32] * 4 + [16] * 4
    by_pass = collections.defaultdict(list)
    for r in lines:
        for key, p in zip(r["keys"], r["passes"]):
            by_pass[p].append(key)
    assert sorted(by_pass) == [0, 1, 2] and all(sorted(v) == sorted(set(by_pass[0])) for v in by_pass.values())
    assert len(by_pass[0]) == 64
    final = torch.load(full_staged_run / "checkpoints" / "step_00000008.pt", weights_only=False)["state_dict"]
    assert final["visual.positional_embedding"].shape == (1 + 4 * 4, 96)  # 32 px / patch 8, and the class token
    assert final["positional_embedding"].shape == (32, 64)


def test_a_checkpoint_of_a_small_stage_loads_for_evaluation_at_its_size(full_staged_run, toy_shards):
    from clipscale.checkpoint.weights import model_from_checkpoint

    bundle, info = model_from_checkpoint(str(full_staged_run / "checkpoints" / "step_00000004.pt"), None,
                                         torch.device("cpu"))  # fmt: skip
    assert info["step"] == 4 and bundle.image_size == 16
    assert bundle.model.visual.positional_embedding.shape == (5, 96) and bundle.model.positional_embedding.shape[0] == 8
    tokens = bundle.tokenizer(["a red square"])
    assert tokens.shape == (1, 8)
    image = bundle.val_transform(Image.new("RGB", (40, 30)))
    assert image.shape == (3, 16, 16)
    with torch.no_grad():
        out = bundle.model.eval()(image=image[None], text=tokens)
    assert out["image_features"].shape == out["text_features"].shape == (1, 64)


@pytest.mark.parametrize("resume_at", [3, 4, 5])  # before, at and after the boundary (after step 4)
def test_resuming_before_at_and_after_a_boundary_is_bitwise(tmp_path, toy_shards, resume_at, full_staged_run):
    part = tmp_path / f"from-{resume_at}"
    checkpoint = full_staged_run / "checkpoints" / f"step_{resume_at:08d}.pt"
    train(tiny_config(part, toy_shards, train__steps=8, schedule__stages=TWO, checkpoint__every_n_steps=1,
                      checkpoint__keep_last=0, checkpoint__resume=str(checkpoint), logging__sample_keys=True,
                      train__peak_tflops=0.1))  # fmt: skip
    full = {r["step"]: r["loss"] for r in records(full_staged_run)}
    resumed = {r["step"]: r["loss"] for r in records(part)}
    assert sorted(resumed) == list(range(resume_at + 1, 9))
    assert all(resumed[s] == full[s] for s in resumed)  # bitwise
    a = torch.load(full_staged_run / "checkpoints" / "step_00000008.pt", weights_only=False)["state_dict"]
    b = torch.load(part / "checkpoints" / "step_00000008.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    keys = {r["step"]: r["keys"] for r in read_sample_keys(full_staged_run)}
    assert {r["step"]: r["keys"] for r in read_sample_keys(part)} == {s: keys[s] for s in resumed}


@pytest.fixture(scope="module")
def full_staged_run(module_tmp, toy_shards):
    run = module_tmp("full-staged")
    train(tiny_config(run, toy_shards, train__steps=8, schedule__stages=TWO, checkpoint__every_n_steps=1,
                      checkpoint__keep_last=0, logging__sample_keys=True, train__peak_tflops=0.1))  # fmt: skip
    return run


@pytest.mark.slow
def test_resuming_on_another_world_size_across_a_boundary_reads_every_sample_once(tmp_path, toy_shards):
    from process_helpers import run

    stages = ("schedule.stages=[{until_step: 3, image_size: 16, context_length: 8, batch_size: 16},"
              " {image_size: 32, context_length: 32, batch_size: 8}]")  # fmt: skip
    first, second = tmp_path / "two-ranks", tmp_path / "one-rank"
    run(2, first, toy_shards, stages, "train.steps=4")  # 2 ranks x 2 workers; a checkpoint at step 2
    checkpoint = first / "checkpoints" / "step_00000002.pt"
    proc = run(1, second, toy_shards, stages, "train.steps=12", f"checkpoint.resume={checkpoint}")
    assert "resuming on another data layout (4 streams -> 2" in proc.stderr
    lines = [r for r in read_sample_keys(first) if r["step"] <= 2] + read_sample_keys(second)
    per_step = collections.Counter()
    for r in lines:
        per_step[r["step"]] += len(r["keys"])
    assert [per_step[s] for s in range(1, 13)] == [16] * 3 + [8] * 9  # 120 samples
    by_pass = collections.defaultdict(list)
    for r in sorted(lines, key=lambda r: (r["step"], r["rank"])):
        for key, p in zip(r["keys"], r["passes"]):
            by_pass[p].append(key)
    assert sorted(by_pass) == [0, 1] and len(by_pass[0]) == len(set(by_pass[0])) == 64
    assert len(by_pass[1]) == len(set(by_pass[1])) == 56 and set(by_pass[1]) <= set(by_pass[0])
    final = torch.load(second / "checkpoints" / "step_00000012.pt", weights_only=False)["state_dict"]
    assert final["visual.positional_embedding"].shape == (17, 96) and final["positional_embedding"].shape == (32, 64)


@pytest.mark.slow
def test_two_ranks_cross_a_boundary_as_one_process_with_the_same_global_batch(tmp_path, toy_shards):
    # DDP is built again around the resized parameters at the boundary: its gradients must still be averaged
    # over the ranks (2 ranks x 1 stream against 1 process accumulating 2 micro-batches from 2 streams)
    from process_helpers import losses, run

    stages = ("schedule.stages=[{until_step: 3, image_size: 16, context_length: 8, batch_size: 16},"
              " {image_size: 32, context_length: 32, batch_size: 8}]")  # fmt: skip
    common = (stages, "train.steps=6", "checkpoint.every_n_steps=1000")
    run(2, tmp_path / "two", toy_shards, *common, "data.workers=1")
    run(1, tmp_path / "one", toy_shards, *common, "data.workers=2", "optim.accum_steps=2")
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert sorted(two) == sorted(one) == list(range(1, 7))
    for step in two:
        assert two[step] == pytest.approx(one[step], abs=1e-4), step


@pytest.mark.slow
def test_fsdp2_changes_the_batch_at_a_boundary_as_ddp_does(tmp_path, toy_shards):
    from process_helpers import losses, run

    common = ("schedule.stages=[{until_step: 3, batch_size: 16}, {batch_size: 8}]", "train.steps=6",
              "checkpoint.every_n_steps=1000", "data.workers=1")  # fmt: skip
    run(2, tmp_path / "ddp", toy_shards, *common)
    run(2, tmp_path / "fsdp2", toy_shards, *common, "engine.name=fsdp2")
    ddp, fsdp2 = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp2")
    assert sorted(ddp) == sorted(fsdp2) == list(range(1, 7))
    for step in ddp:
        assert fsdp2[step] == pytest.approx(ddp[step], abs=1e-4), step
    batches = [r["global_batch"] for r in read_jsonl(tmp_path / "fsdp2" / "metrics.jsonl") if "loss" in r]
    assert batches == [16] * 3 + [8] * 3


@pytest.mark.slow
def test_a_boundary_in_samples_stays_put_when_the_world_size_changes(tmp_path, toy_shards):
    # 2 ranks x 4 = 8 a step: 48 samples end stage 0 after step 6. Resumed from step 4 (32 samples) on one
    # rank, 4 a step: the 16 samples left take 4 steps, so the boundary is after step 8, not 48 / 4 = 12
    from process_helpers import run

    stages = (
        "schedule.stages=[{until_samples: 48, image_size: 16, context_length: 8}, {image_size: 32, context_length: 32}]"
    )
    first, second = tmp_path / "two-ranks", tmp_path / "one-rank"
    run(2, first, toy_shards, stages, "train.steps=8")
    proc = run(1, second, toy_shards, stages, "train.steps=14",
               f"checkpoint.resume={first / 'checkpoints' / 'step_00000004.pt'}")  # fmt: skip
    assert "stage boundaries from step 4: stage 1 to step 8 at batch 4" in proc.stderr
    lines = [r for r in read_sample_keys(first) if r["step"] <= 4] + read_sample_keys(second)
    in_stage0 = sum(len(r["keys"]) for r in lines if r["step"] <= 8)
    assert in_stage0 == 48
    records = {r["step"]: r for r in read_jsonl(second / "metrics.jsonl") if "loss" in r}
    assert [records[s]["stage/image_size"] for s in range(5, 15)] == [16] * 4 + [32] * 6
    status = json.loads((second / "status.json").read_text())
    assert status["stage"]["index"] == 1 and status["next_boundary"] is None


def test_the_spike_guard_judges_a_new_batch_size_against_its_own_stage(tmp_path, toy_shards):
    # the contrastive loss grows with log(batch): 4 -> 64 a step roughly triples it. Judged against the
    # last stage's median, the first steps of the big batch would be "spikes" and roll the run back
    run = tmp_path / "run"
    train(tiny_config(run, toy_shards, train__steps=12, schedule__stages="[{until_step: 6, batch_size: 4}, "
                      "{batch_size: 64}]", checkpoint__every_n_steps=2, train__spike_guard__factor=1.3,
                      train__spike_guard__patience=2, train__spike_guard__window=10,
                      train__spike_guard__skip_batches=1))  # fmt: skip
    losses = {r["step"]: r["loss"] for r in records(run)}
    assert sorted(losses) == list(range(1, 13))
    assert min(losses[s] for s in (7, 8)) > 1.3 * max(losses[s] for s in range(2, 7))  # what would have fired
    assert "rollbacks" not in json.loads((run / "status.json").read_text())
