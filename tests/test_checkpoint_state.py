"""The training state in checkpoints: rollbacks keep what they should, the current config wins on
resume, a checkpoint that fails to load is skipped, the data loader leaves the global RNG alone."""

import pytest
import torch

from clipscale.checkpoint import CheckpointManager
from clipscale.errors import CheckpointError
from clipscale.job.distributed import DistEnv
from clipscale.metrics import read_jsonl
from clipscale.train import Trainer, train

from helpers import tiny_config

ENV = DistEnv(0, 1, 0, torch.device("cpu"), None, "none")


def names(run_dir):
    return [p.name for p in CheckpointManager(run_dir, is_main=False).all_checkpoints()]


def test_a_rollback_moves_later_checkpoints_aside_and_keeps_the_new_ones(tmp_path, toy_shards):
    run = tmp_path / "run"
    common = {"checkpoint__every_n_steps": 2, "checkpoint__keep_last": 3, "data__batch_size": 8}
    train(tiny_config(run, toy_shards, train__steps=6, **common))
    assert names(run) == ["step_00000002.pt", "step_00000004.pt", "step_00000006.pt"]
    # roll back to step 2 (what the divergence error suggests) and train on
    step2 = run / "checkpoints" / "step_00000002.pt"
    train(tiny_config(run, toy_shards, train__steps=5, checkpoint__resume=str(step2), **common))
    assert names(run) == ["step_00000002.pt", "step_00000004.pt", "step_00000005.pt"]  # the new 4 and 5
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000005.pt"
    moved = sorted((run / "checkpoints" / "abandoned").iterdir())
    aside = sorted(p.name.rsplit(".", 1)[0] for p in moved if p.suffix != ".why")
    assert aside == ["step_00000004.pt", "step_00000004.pt.sha256", "step_00000006.pt", "step_00000006.pt.sha256"]
    whys = [p.read_text() for p in moved if p.suffix == ".why"]  # each says why it was moved
    assert len(whys) == 2 and all(w.startswith("later than step_00000002.pt") for w in whys)
    assert (
        torch.load(run / "checkpoints" / "step_00000005.pt", weights_only=True)["train_state"]["progress"]["step"] == 5
    )
    trainer = Trainer(tiny_config(run, toy_shards, train__steps=8, checkpoint__resume="auto", **common), ENV)
    assert trainer.step == 5  # auto picks this history's newest, not the abandoned step 6
    trainer.close()


def test_changed_learning_rate_and_weight_decay_on_resume_take_effect(tmp_path, toy_shards):
    run = tmp_path / "run"
    common = {"schedule__name": "constant", "schedule__warmup_steps": 0, "checkpoint__every_n_steps": 2}
    train(tiny_config(run, toy_shards, train__steps=2, optim__lr=1e-3, optim__weight_decay=0.2, **common))
    trainer = Trainer(
        tiny_config(
            run,
            toy_shards,
            train__steps=4,
            optim__lr=5e-4,
            optim__weight_decay=0.05,
            checkpoint__resume="auto",
            **common,
        ),
        ENV,
    )
    groups = {g["group"]: g for g in trainer.engine.optimizer.param_groups}
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    assert trainer.engine.lr() == 5e-4 and trainer.engine.schedule_step() == 2
    trainer.fit()
    lrs = {r["step"]: r["lr"] for r in read_jsonl(run / "metrics.jsonl") if "lr" in r}
    assert lrs[1] == lrs[2] == 1e-3 and lrs[3] == lrs[4] == 5e-4
    trainer.close()


def test_a_newest_checkpoint_that_fails_to_load_is_skipped_under_auto(tmp_path, toy_shards, capfd):
    run = tmp_path / "run"
    train(tiny_config(run, toy_shards, train__steps=4, checkpoint__every_n_steps=2))
    newest = run / "checkpoints" / "step_00000004.pt"
    newest.write_bytes(b"not a checkpoint at all")  # damaged after its checksum was lost
    (run / "checkpoints" / "step_00000004.pt.sha256").unlink()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(newest.read_bytes())
    trainer = Trainer(tiny_config(run, toy_shards, train__steps=6, checkpoint__resume="auto"), ENV)
    assert trainer.step == 2
    assert "step_00000004.pt could not be loaded" in capfd.readouterr().err
    trainer.close()
    with pytest.raises(CheckpointError, match="cannot load"):
        Trainer(tiny_config(tmp_path / "other", toy_shards, checkpoint__resume=str(bad)), ENV)
    assert (run / "checkpoints" / "abandoned").is_dir()  # the damaged newest one was moved aside, not deleted


def test_starting_the_data_loader_leaves_the_global_rng_alone(tmp_path, toy_shards):
    with Trainer(tiny_config(tmp_path, toy_shards, data__workers=2), ENV) as trainer:
        before = torch.get_rng_state()
        trainer.data.next()
        assert torch.equal(torch.get_rng_state(), before)


def test_an_explicit_resume_path_applies_once_then_the_run_continues_from_its_own_newest(tmp_path, toy_shards):
    """A requeued job runs the same command again: checkpoint.resume=<path> must not roll back again."""
    source, run = tmp_path / "source", tmp_path / "run"
    train(tiny_config(source, toy_shards, train__steps=2, checkpoint__every_n_steps=2))
    step2 = source / "checkpoints" / "step_00000002.pt"
    common = {"checkpoint__resume": str(step2), "checkpoint__every_n_steps": 2}
    train(tiny_config(run, toy_shards, train__steps=4, **common))  # resumes from the other run's step 2
    trainer = Trainer(tiny_config(run, toy_shards, train__steps=6, **common), ENV)  # the same command, requeued
    assert trainer.step == 4 and names(run) == ["step_00000004.pt"]
    trainer.close()


def test_resume_from_an_empty_checkpoints_folder_starts_fresh(tmp_path, toy_shards):
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)
    trainer = Trainer(
        tiny_config(tmp_path / "run", toy_shards, checkpoint__resume=str(tmp_path / "old" / "checkpoints")), ENV
    )
    assert trainer.step == 0
    trainer.close()


def test_the_current_config_wins_also_over_an_old_optimizer_without_group_tags():
    from clipscale.config import load_config
    from clipscale.optim import apply_hyperparameters

    weights, gains = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    old = torch.optim.AdamW(
        [{"params": [weights], "weight_decay": 0.2}, {"params": [gains], "weight_decay": 0.0}], lr=1e-3, foreach=False
    )
    apply_hyperparameters(old, load_config(None, ["optim.weight_decay=0.05", "optim.lr=3e-4"]).optim)
    assert [g["weight_decay"] for g in old.param_groups] == [0.05, 0.0]
    assert [g["group"] for g in old.param_groups] == ["decay", "no_decay"] and old.param_groups[0]["lr"] == 3e-4
