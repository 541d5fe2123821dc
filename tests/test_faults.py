"""Faults in the loop: the hang watchdog, stalled shard reads, and the loss-spike guard.

The two-rank frozen-rank case with a SLURM requeue is in test_slurm.py."""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from clipscale.job.distributed import init_distributed
from clipscale.job.watchdog import EXIT_HUNG
from clipscale.metrics import read_jsonl, read_sample_keys
from clipscale.shards import write_shards
from clipscale.train import Trainer, TrainingDiverged, train

from helpers import color_samples, make_shards, tiny_config, with_wrong_colour

# --------------------------------------------------------------------------- the watchdog

WATCHED = textwrap.dedent("""
    import sys, threading, time
    from clipscale.job.watchdog import HangWatchdog
    dog = HangWatchdog(sys.argv[1], rank=3, timeout_s=1.0, grace_s=30.0, status_fields=lambda: {"total_steps": 9})
    time.sleep(2.0)  # the first step: the grace period applies
    dog.beat(1)
    with dog.allow("checkpoint"):
        time.sleep(2.5)  # a long checkpoint: allowed too
    dog.beat(2)
    def waiting_in_a_collective():
        threading.Event().wait()
    print("stuck", flush=True)
    waiting_in_a_collective()
""")


def test_watchdog_leaves_every_threads_stacks_and_exits_when_no_step_finishes(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", WATCHED, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout.readline().strip() == "stuck"  # the first step and the checkpoint did not fire it
    stuck_at = time.monotonic()
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == EXIT_HUNG, out
    assert 1.0 <= time.monotonic() - stuck_at < 30, out
    (report,) = (tmp_path / "hang").glob("rank3-*.txt")
    text = report.read_text()
    assert "no progress for" in text and "during step after step 2" in text
    assert "waiting_in_a_collective" in text and "clipscale-hang-watchdog" not in text.split("\n")[0]
    status = json.loads((tmp_path / "status.json").read_text())
    assert (status["state"], status["step"], status["hung_ranks_reported"], status["total_steps"]) == (
        "hung",
        2,
        [3],
        9,
    )
    assert f"exiting with code {EXIT_HUNG}" in out


AFTER_FIT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[3])
    from clipscale.job.distributed import init_distributed
    from clipscale.train import Trainer
    from clipscale.job.watchdog import HangWatchdog
    from helpers import tiny_config
    built = HangWatchdog(sys.argv[1], rank=0, timeout_s=0.5, grace_s=0.5)
    built.idle()  # what Trainer.__init__ leaves: a Trainer that nobody fits
    cfg = tiny_config(sys.argv[1], sys.argv[2], train__steps=2, train__hang_timeout_s=3.0, train__hang_grace_s=120)
    trainer = Trainer(cfg, init_distributed("cpu"))
    trainer.fit()  # returns; the trainer is neither closed nor dropped, as in a notebook
    time.sleep(7.0)  # more than twice the timeout
    print("alive", flush=True)
""")


def test_a_trainer_whose_fit_returned_never_stops_the_process_later(tmp_path, toy_shards):
    proc = subprocess.run(
        [sys.executable, "-c", AFTER_FIT, str(tmp_path / "run"), toy_shards, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "alive", proc.stdout + proc.stderr[-3000:]
    assert not (tmp_path / "run" / "hang").exists()


# --------------------------------------------------------------------------- stalled reads


def test_a_pipe_shard_that_never_delivers_is_abandoned_and_the_run_finishes(tmp_path):
    make_shards(tmp_path / "data", n_shards=2, per_shard=16)
    data = tmp_path / "data"
    stalled = f"pipe:sleep 613; cat {data}/toy-000001.tar"  # named toy-000001.tar in the manifest
    common = {
        "data__manifest": str(data / "manifest.json"),
        "data__batch_size": 8,
        "data__workers": 1,
        "data__shuffle": "false",
        "data__read_timeout_s": 1.5,
        "logging__sample_keys": "true",
        "train__steps": 6,
        "checkpoint__every_n_steps": 3,
    }
    shards = f"{data}/toy-000000.tar::{stalled}"
    started = time.monotonic()
    result = train(tiny_config(tmp_path / "full", shards, **common))
    assert result["step"] == 6 and not result["preempted"]
    assert time.monotonic() - started < 120
    status = json.loads((tmp_path / "full" / "status.json").read_text())
    assert status["state"] == "finished"
    records = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[-1]["skipped_samples"] >= 16  # the stalled shard's samples, counted
    keys = {(r["step"], r["rank"]): r["keys"] for r in read_sample_keys(tmp_path / "full")}
    assert all(k.startswith("s0000") and int(k[1:]) < 16 for ks in keys.values() for k in ks)  # shard 0 only
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if stalled[5:] in " ".join(p.info["cmdline"] or [])]
    assert not leftovers  # the stalled command was stopped, not left behind
    # the positions stay exact: resuming at step 3 gives the same samples for steps 4..6
    resumed = train(
        tiny_config(
            tmp_path / "again",
            shards,
            **common,
            checkpoint__resume=f"{tmp_path}/full/checkpoints/step_00000003.pt",
        )
    )
    assert resumed["step"] == 6
    again = {(r["step"], r["rank"]): r["keys"] for r in read_sample_keys(tmp_path / "again")}
    assert again == {k: v for k, v in keys.items() if k[0] > 3}


# --------------------------------------------------------------------------- the spike guard

GOOD, POISON, STEPS = 512, 48, 30  # 16 samples a step: steps 21-23 read the poison


@pytest.fixture(scope="module")
def spiky_shards(tmp_path_factory):
    """Colour/shape pairs with, after 320 samples (20 steps of 16), 48 pairs whose captions name
    the wrong colour: once the model has learned the colours, those steps spike the loss."""
    return spiky(tmp_path_factory.mktemp("spiky"), 320)


def spiky(out, at: int) -> str:
    """GOOD good pairs with POISON wrong-caption pairs (keys p000000...) inserted at sample `at`."""
    good = list(color_samples(GOOD, size=16, seed=1))
    poison = [with_wrong_colour(s) for s in color_samples(POISON, size=16, seed=2, prefix="p")]
    samples = good[:at] + poison + good[at:]
    write_shards(samples, out, "mix", 16)
    return f"{out}/mix-{{000000..{len(samples) // 16 - 1:06d}}}.tar"


def spike_config(run_dir, shards, **overrides):
    settings = {
        "data__shuffle": "false",
        "logging__sample_keys": "true",
        "train__steps": STEPS,
        "checkpoint__every_n_steps": 5,
        "optim__lr": 2e-3,
        "train__spike_guard__factor": 3.0,
        "train__spike_guard__window": 10,
        "train__spike_guard__patience": 3,
        "train__spike_guard__skip_batches": 3,
    }
    settings.update(overrides)
    return tiny_config(run_dir, shards, **settings)


def trained(run_dir):
    """({step: loss}, {(step, rank, skipped batch or None): keys}) of a run."""
    losses = {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}
    keys = {(r["step"], r["rank"], r.get("skipped")): r["keys"] for r in read_sample_keys(run_dir)}
    return losses, keys


@pytest.fixture(scope="module")
def spiked_run(spiky_shards, module_tmp):
    run_dir = module_tmp("spiked") / "run"
    result = train(spike_config(run_dir, spiky_shards))
    assert result["step"] == STEPS
    return run_dir


def test_a_loss_spike_is_rolled_back_and_its_data_skipped(spiked_run):
    losses, keys = trained(spiked_run)
    assert sorted(losses) == list(range(1, STEPS + 1))  # every step once: the rolled-back ones were redone
    (event,) = [r for r in read_jsonl(spiked_run / "metrics.jsonl") if r.get("event") == "rollback"]
    assert (event["step"], event["rollback/from_step"], event["rollback/to_step"]) == (21, 23, 20)
    assert event["rollback/loss"] > 3 * event["rollback/median"] and event["rollback/skipped_batches"] == 3
    status = json.loads((spiked_run / "status.json").read_text())
    assert status["state"] == "finished" and [(r["step"], r["to_step"]) for r in status["rollbacks"]] == [(23, 20)]
    skipped = [k for (step, _, batch), ks in keys.items() if batch is not None for k in ks]
    assert sorted(skipped) == [f"p{i:06d}" for i in range(POISON)]  # exactly the data that caused it
    used = [k for (_, _, batch), ks in keys.items() if batch is None for k in ks]
    assert not [k for k in used if k.startswith("p")] and len(used) == STEPS * 16 == len(set(used))
    assert max(losses[s] for s in range(21, STEPS + 1)) < 3 * event["rollback/median"]
    assert (spiked_run / "checkpoints" / f"step_{STEPS:08d}.pt").exists()


@pytest.mark.parametrize("resume_at", [20, 25])
def test_resuming_before_or_after_a_rollback_is_exact(spiked_run, spiky_shards, tmp_path, resume_at):
    """From before the spike the same rollback happens again; from after it the skip is remembered."""
    run_dir = tmp_path / "run"
    train(spike_config(run_dir, spiky_shards, checkpoint__resume=f"{spiked_run}/checkpoints/step_{resume_at:08d}.pt"))
    (losses, keys), (full_losses, full_keys) = trained(run_dir), trained(spiked_run)
    assert losses == {s: v for s, v in full_losses.items() if s > resume_at}  # bitwise
    assert keys == {k: v for k, v in full_keys.items() if k[0] > resume_at}
    rollbacks = json.loads((run_dir / "status.json").read_text())["rollbacks"]
    assert [(r["step"], r["to_step"]) for r in rollbacks] == [(23, 20)]


def preempted_at(stop_after: int, cfg) -> None:
    """Train `cfg` in this process as if SIGUSR1 came during step `stop_after`."""
    trainer = Trainer(cfg, init_distributed("cpu"))
    step = trainer.train_step

    def train_step():
        if trainer.step + 1 == stop_after:
            trainer.preempt.received, trainer.preempt.received_during = "SIGUSR1", stop_after
        return step()

    trainer.train_step = train_step
    try:
        assert trainer.fit()["preempted"] and trainer.step == stop_after
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def s3():
    from s3_helpers import S3Server

    from clipscale.wds import remote

    server = S3Server()
    remote.configure()
    yield server
    server.stop()
    remote.configure()


def test_a_spike_preempted_and_requeued_into_an_empty_folder_rolls_back_from_the_bucket(
    spiked_run, spiky_shards, tmp_path, s3
):
    """Spike, preemption at step 23 (the rollback decided, not done), requeue on a machine with an
    empty run folder: the bucket's latest (23) comes first, then the rollback target (20), which
    retention kept in the bucket; the run ends as the uninterrupted one."""
    s3.client().create_bucket(Bucket="spike")
    bucket = {"checkpoint__remote": "s3://spike/run", "checkpoint__keep_last": 1}
    preempted_at(23, spike_config(tmp_path / "first", spiky_shards, **bucket))
    elsewhere = tmp_path / "elsewhere"
    train(spike_config(elsewhere, spiky_shards, checkpoint__resume="auto", **bucket))
    (losses, keys), (full_losses, full_keys) = trained(elsewhere), trained(spiked_run)
    assert losses == {s: v for s, v in full_losses.items() if s > 20}  # bitwise
    assert keys == {k: v for k, v in full_keys.items() if k[0] > 20}
    assert [(r["step"], r["to_step"]) for r in json.loads((elsewhere / "status.json").read_text())["rollbacks"]] == [
        (23, 20)
    ]
    listed = s3.client().list_objects_v2(Bucket="spike", Prefix="run/checkpoints/")["Contents"]
    names = sorted(o["Key"].removeprefix("run/checkpoints/") for o in listed)
    assert any(n.startswith("abandoned/step_00000023.pt.") for n in names) and f"step_{STEPS:08d}.pt" in names
    assert not [n for n in names if n.startswith("step_") and not n.startswith(f"step_{STEPS:08d}")]


@pytest.mark.parametrize("stop_after, keep_last", [(22, 3), (23, 3), (23, 1)])
def test_preempted_inside_a_spike_resumes_into_the_same_rollback(
    spiked_run, spiky_shards, tmp_path, stop_after, keep_last
):
    """Stopped at step 22 (spiking, not yet decided) or 23 (decided, not yet rolled back): the
    preemption checkpoint is written, and the resumed run rolls back exactly as the uninterrupted one.
    With keep_last=1 the preemption checkpoint must not push out the one the rollback needs."""
    run_dir = tmp_path / "run"
    preempted_at(stop_after, spike_config(run_dir, spiky_shards, checkpoint__keep_last=keep_last))
    assert (run_dir / "checkpoints" / f"step_{stop_after:08d}.pt").exists()
    assert (run_dir / "checkpoints" / "step_00000020.pt").exists()  # kept for the rollback
    train(spike_config(run_dir, spiky_shards, checkpoint__resume="auto", checkpoint__keep_last=keep_last))
    assert trained(run_dir) == trained(spiked_run)
    assert list((run_dir / "checkpoints" / "abandoned").glob(f"step_{stop_after:08d}.pt.*"))  # moved aside


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train__spike_guard__skip_batches": 0, "train__spike_guard__max_rollbacks": 1}, "spiked again at step 23"),
        ({"checkpoint__every_n_steps": 1000}, "no checkpoint from before step 21"),
    ],
)
def test_a_spike_that_cannot_be_healed_stops_the_run_with_a_clear_error(spiky_shards, tmp_path, overrides, message):
    with pytest.raises(TrainingDiverged, match=message):
        train(spike_config(tmp_path / "run", spiky_shards, **overrides))
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and message in status["error"]


def test_rolling_back_to_the_same_checkpoint_again_skips_further(spiky_shards, tmp_path):
    """skip_batches=1 leaves poison after the first rollback: the second one (to the same checkpoint)
    must skip 2 batches, not replay the same data into the same spike until max_rollbacks gives up."""
    run_dir = tmp_path / "run"
    overrides = {"train__spike_guard__skip_batches": 1, "train__spike_guard__patience": 2}
    result = train(spike_config(run_dir, spiky_shards, **overrides))
    assert result["step"] == STEPS
    events = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event") == "rollback"]
    assert len(events) >= 2 and all(e["rollback/to_step"] == 20 for e in events)
    assert [e["rollback/skipped_batches"] for e in events] == list(range(1, len(events) + 1))


def test_a_rank_failing_because_another_ranks_watchdog_fired_keeps_the_status_hung(tmp_path, toy_shards, monkeypatch):
    """The watchdog of one rank writes `hung` and exits; the others' next collective fails. Those
    must not overwrite the status with `failed` (no requeue) but exit with EXIT_HUNG too."""
    from clipscale.job.status import write_status

    def fit(self):
        write_status(self.run_dir, "hung", step=self.step, hung_ranks_reported=[1])  # rank 1's watchdog
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer")

    monkeypatch.setattr(Trainer, "fit", fit)
    result = train(tiny_config(tmp_path / "run", toy_shards, train__steps=2))
    assert result["exit_code"] == EXIT_HUNG
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "hung"
    monkeypatch.setattr(Trainer, "fit", lambda self: (_ for _ in ()).throw(RuntimeError("a real crash")))
    with pytest.raises(RuntimeError, match="a real crash"):
        train(tiny_config(tmp_path / "run", toy_shards, train__steps=2))
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"  # not an old hang


@pytest.fixture(scope="module")
def late_spiky_shards(tmp_path_factory):
    """As spiky_shards, with the poison 3 steps later (steps 24-26): the rollback to step 20 replays
    steps 21-23 before it skips the poisoned batches."""
    return spiky(tmp_path_factory.mktemp("late_spiky"), 368)


def test_preempted_during_the_replay_the_resumed_run_skips_the_same_batches(late_spiky_shards, tmp_path):
    """The skip waiting for the replay to reach it is in the checkpoint: a run preempted at step 22 of
    the replay (after the rollback to 20, before the skip after 23) resumes into the same skip and
    ends bitwise as the run never stopped."""
    full = tmp_path / "full"
    assert train(spike_config(full, late_spiky_shards))["step"] == STEPS
    (event,) = [r for r in read_jsonl(full / "metrics.jsonl") if r.get("event") == "rollback"]
    assert (event["rollback/to_step"], event["rollback/skipped_steps"]) == (20, [24, 26])

    run_dir = tmp_path / "run"
    trainer = Trainer(spike_config(run_dir, late_spiky_shards), init_distributed("cpu"))
    step = trainer.train_step

    def train_step():  # SIGUSR1 during step 22 of the replay, not its first pass
        if trainer.guard.rollbacks and trainer.step + 1 == 22:
            trainer.preempt.received, trainer.preempt.received_during = "SIGUSR1", 22
        return step()

    trainer.train_step = train_step
    try:
        assert trainer.fit()["preempted"] and trainer.step == 22
        assert trainer.guard.pending == [{"after": 23, "batches": 3}]  # saved with the checkpoint of step 22
    finally:
        trainer.close()
    train(spike_config(run_dir, late_spiky_shards, checkpoint__resume="auto"))
    assert trained(run_dir) == trained(full)
    skipped = [k for (_, _, batch), ks in trained(run_dir)[1].items() if batch is not None for k in ks]
    assert sorted(skipped) == [f"p{i:06d}" for i in range(POISON)]


def test_a_second_rollback_during_a_replay_keeps_the_first_skip():
    """A checkpoint saved during the replay of a first rollback holds that rollback's skip (after step
    1300, 200 batches). A second spike rolls back to it and skips 3 batches after step 1247: the first
    window is kept, 3 steps earlier (its batches now come 3 steps sooner), not overwritten."""
    from clipscale.config.schema import SpikeGuardConfig
    from clipscale.job.guard import Rollback, SpikeGuard

    guard = SpikeGuard(SpikeGuardConfig(skip_batches=3))
    guard.load_state_dict({"history": [], "pending": {"after": 1300, "batches": 200}})  # (as saved before lists)
    record = {"step": 1250, "to_step": 1200, "skipped_steps": [1248, 1250]}
    guard.rolled_back(Rollback(Path("step_00001200.pt"), 3, 1247, record, [record]))
    assert [guard.skip_due(s) for s in (1246, 1247, 1296, 1297, 1300)] == [0, 3, 0, 200, 0]
    assert guard.pending == [] and guard.state_dict()["pending"] == []
