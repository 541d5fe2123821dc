"""Exact resume and fault tolerance, with real processes (torchrun + gloo on CPU)."""

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest
import torch

from clipscale.checkpoint import CheckpointManager, checksum_path
from clipscale.errors import CheckpointError
from clipscale.job.preempt import EXIT_PREEMPTED
from clipscale.metrics import read_jsonl, read_sample_keys

from helpers import tiny_config
from process_helpers import COMMON, CURVE, ENV, STEPS, kill_and_resume, logged_steps, losses, run, start, wait_for


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from helpers import make_shards

    return make_shards(tmp_path_factory.mktemp("resume_shards"), n_shards=8, per_shard=16)


@pytest.mark.slow
def test_sigkill_and_auto_resume_is_bitwise_identical(tmp_path, shards):
    kill_and_resume(1, tmp_path, shards, seed=1)


@pytest.mark.slow
def test_sigkill_of_two_ranks_and_auto_resume_is_bitwise_identical(tmp_path, curve_shards, ddp_curves):
    # DDP's reference curve (conftest) is the uninterrupted run of the same settings
    kill_and_resume(2, tmp_path, curve_shards, *CURVE, seed=2, full=ddp_curves["plain_dir"])


@pytest.mark.slow
@pytest.mark.parametrize("target", ["one_worker", "torchrun"])
def test_sigusr1_checkpoints_all_ranks_and_restart_continues(tmp_path, shards, target):
    run_dir = tmp_path / "run"
    forward = ("--signals-to-handle=SIGTERM,SIGINT,SIGUSR1",) if target == "torchrun" else ()
    proc = start(2, run_dir, shards, "checkpoint.every_n_steps=1000", torchrun_args=forward, torchrun=True)
    wait_for(lambda: logged_steps(run_dir) >= 3, proc)
    workers = [p for p in psutil.Process(proc.pid).children() if "clipscale.train" in " ".join(p.cmdline())]
    assert len(workers) == 2
    signalled_at = logged_steps(run_dir)
    if target == "torchrun":
        proc.send_signal(signal.SIGUSR1)  # torchrun forwards it to both workers
    else:
        workers[1].send_signal(signal.SIGUSR1)  # one rank only: the decision is shared
    output = proc.communicate(timeout=300)[0]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and status["signal"] == "SIGUSR1"
    if target == "one_worker":  # the launcher passes the workers' exit code on, in one line
        assert proc.returncode == EXIT_PREEMPTED and "Traceback" not in output, output
        assert f"with code {EXIT_PREEMPTED} (preempted: checkpointed and stopped)" in output, output
    else:  # the launcher was signalled itself: it waited for the workers' checkpoint; one line, no traceback
        assert proc.returncode == 128 + signal.SIGUSR1, output
        assert "clipscale launch: stopped by SIGUSR1" in output and "Traceback" not in output, output
    saved = CheckpointManager(run_dir, is_main=False).latest()
    step = int(saved.name[5:13])
    # the run stops at the end of the step the signal arrived in (or the next one, if the flag was
    # read just before it came); how many steps ran between sending and arrival is up to the OS
    assert signalled_at <= status["signal_step"] <= step <= status["signal_step"] + 1, (signalled_at, status, step)
    assert status["step"] == step < STEPS
    run(2, run_dir, shards, "checkpoint.resume=auto", "checkpoint.every_n_steps=1000")
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == list(range(1, STEPS + 1))
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


@pytest.mark.slow
def test_single_process_sigterm_exits_with_the_preempted_code(tmp_path, shards):
    run_dir = tmp_path / "run"
    # steps to spare: on a loaded machine the 12 steps of COMMON could all pass before the signal lands
    proc = start(1, run_dir, shards, "checkpoint.every_n_steps=1000", "train.steps=100000")
    wait_for(lambda: logged_steps(run_dir) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED
    assert json.loads((run_dir / "status.json").read_text())["state"] == "preempted"


SLOW_SAVE = """
import sys, time
import clipscale.engine.ddp as ddp
real = ddp.torch_save_synced
calls = []
def slow(obj, path):
    calls.append(path)
    if len(calls) == 2:  # the second checkpoint: write half of it, then hang until killed
        import io, torch
        buf = io.BytesIO(); torch.save(obj, buf)
        with open(path, "wb") as f:
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush()
        print("WRITING", flush=True)
        time.sleep(600)
    real(obj, path)
ddp.torch_save_synced = slow
from clipscale.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous_and_corruption_falls_back(tmp_path, shards):
    run_dir = tmp_path / "run"
    args = [f"run.dir={run_dir}", f"data.train_shards={shards}", *COMMON, "data.workers=0"]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        start_new_session=True,
    )
    tmp = run_dir / "checkpoints" / ".step_00000004.pt.tmp"
    wait_for(lambda: tmp.is_file() and tmp.stat().st_size > 0, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpts = CheckpointManager(run_dir, is_main=False)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002.pt"
    assert ckpts.latest().name == "step_00000002.pt"
    assert torch.load(ckpts.latest(), weights_only=True)["train_state"]["progress"]["step"] == 2
    # finish the run, then damage the newest checkpoint: auto-resume falls back to the one before
    run(1, run_dir, shards, "checkpoint.resume=auto", "data.workers=0")
    newest = run_dir / "checkpoints" / f"step_{STEPS:08d}.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    assert ckpts.latest().name == f"step_{STEPS - 2:08d}.pt"
    from clipscale.job.distributed import DistEnv
    from clipscale.train import Trainer

    single = DistEnv(0, 1, 0, torch.device("cpu"), None, "none")
    named = tiny_config(tmp_path / "other", shards, checkpoint__resume=str(newest))
    with pytest.raises(CheckpointError, match=f"checkpoint.resume: {newest} is damaged \\(sha256 mismatch"):
        Trainer(named, single)  # named explicitly: an error, not a fallback
    (run_dir / "checkpoints" / "latest").write_text("garbage\n")
    assert ckpts.latest().name == f"step_{STEPS - 2:08d}.pt"
    assert checksum_path(newest).is_file()


@pytest.mark.slow
def test_resume_on_another_world_size_covers_the_epoch_without_repeats(tmp_path, shards):
    # 8 shards x 16 = 128 samples = one epoch. 2 ranks x 2 workers for 5 steps (40 samples), then
    # 1 rank x 2 workers: the other 88 samples of the epoch come next, none twice.
    run_dir = tmp_path / "run"
    run(2, run_dir, shards, "train.steps=5")
    proc = run(1, run_dir, shards, "checkpoint.resume=auto", "train.steps=30")
    assert "resuming on another data layout (4 streams -> 2 = world size x workers" in proc.stderr
    lines = read_sample_keys(run_dir)
    epoch0 = [
        k for r in sorted(lines, key=lambda r: (r["step"], r["rank"])) for k, p in zip(r["keys"], r["passes"]) if p == 0
    ]
    assert len(epoch0) == len(set(epoch0)) == 128
    first_new = [k for r in lines if r["step"] > 5 for k in r["keys"]][:88]
    assert set(first_new).isdisjoint(k for r in lines if r["step"] <= 5 for k in r["keys"])


class NaNOnCalls(torch.nn.Module):
    def __init__(self, inner, bad_calls):
        super().__init__()
        self.inner, self.bad_calls, self.calls = inner, set(bad_calls), 0
        self.uses_bias, self.gather = inner.uses_bias, inner.gather

    def forward(self, *args):
        self.calls += 1
        loss = self.inner(*args)
        return loss * float("nan") if self.calls in self.bad_calls else loss


def test_nan_steps_are_skipped_counted_then_abort(tmp_path, toy_shards):
    from clipscale.job.distributed import DistEnv
    from clipscale.train import Trainer, TrainingDiverged

    env = DistEnv(0, 1, 0, torch.device("cpu"), None, "none")
    with Trainer(tiny_config(tmp_path / "a", toy_shards, train__steps=6, train__max_nonfinite_steps=3), env) as trainer:
        trainer.loss_fn = NaNOnCalls(trainer.loss_fn, {2, 3})
        summary = trainer.fit()
        assert summary["step"] == 6 and trainer.progress.nonfinite_total == 2
    records = {r["step"]: r for r in read_jsonl(tmp_path / "a" / "metrics.jsonl")}
    assert records[6]["skipped_steps"] == 2 and records[3]["loss"] == "nan"
    with Trainer(
        tiny_config(tmp_path / "b", toy_shards, train__steps=8, train__max_nonfinite_steps=3), env
    ) as trainer2:
        trainer2.loss_fn = NaNOnCalls(trainer2.loss_fn, {2, 3, 4})
        with pytest.raises(TrainingDiverged, match="not finite for 3 consecutive steps"):
            trainer2.fit()
        assert trainer2.step == 4


def test_skipped_step_leaves_weights_untouched(tmp_path, toy_shards):
    from clipscale.job.distributed import DistEnv
    from clipscale.train import Trainer

    env = DistEnv(0, 1, 0, torch.device("cpu"), None, "none")
    with Trainer(tiny_config(tmp_path, toy_shards, train__steps=2), env) as trainer:
        trainer.loss_fn = NaNOnCalls(trainer.loss_fn, {2})
        trainer.cfg.train.steps = 1
        trainer.fit()
        after_one = {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}
        trainer.cfg.train.steps = 2
        trainer.fit()
        for k, v in trainer.engine.module.state_dict().items():
            assert torch.equal(v, after_one[k]), k


def test_incompatible_checkpoint_lists_the_differences(tmp_path, toy_shards):
    from clipscale.train import train

    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, toy_shards, train__steps=1))
    with pytest.raises(CheckpointError) as err:
        train(tiny_config(run_dir, toy_shards, train__steps=2, checkpoint__resume="auto", model__name="clip-small"))
    text = str(err.value)
    assert "model.name: 'clip-tiny' in the checkpoint, 'clip-small' now" in text
    assert "embedding size: 64 in the checkpoint, 128 now" in text
    assert "weight shape(s) differ" in text and "\n" not in text


@pytest.mark.slow
def test_async_checkpoints_resume_exactly(tmp_path, shards):
    full, part = tmp_path / "full", tmp_path / "part"
    run(1, full, shards, "checkpoint.async=true")
    run(1, part, shards, "checkpoint.async=true", "train.steps=7")
    assert (part / "checkpoints" / "latest").read_text().strip() == "step_00000007.pt"
    # the 7-step run has another LR schedule; resume the full-length run from its async step-6 checkpoint
    run(
        1,
        part / "again",
        shards,
        f"checkpoint.resume={full / 'checkpoints' / 'step_00000006.pt'}",
        "checkpoint.async=true",
    )
    a, b = losses(full), losses(part / "again")
    assert [a[s] for s in range(7, STEPS + 1)] == [b[s] for s in range(7, STEPS + 1)]
    names = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert "step_00000006.pt" in names and "step_00000006.pt.sha256" in names


@pytest.mark.slow
def test_a_dead_rank_stops_the_job_and_torchrun_restarts_it(tmp_path, shards):
    run_dir = tmp_path / "run"
    proc = start(2, run_dir, shards, "checkpoint.resume=auto", torchrun_args=("--max-restarts=1",))
    wait_for(lambda: logged_steps(run_dir) >= 5, proc)
    workers = [p for p in psutil.Process(proc.pid).children() if "clipscale.train" in " ".join(p.cmdline())]
    workers[1].kill()
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-4000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["restart_count"] == 1
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, STEPS + 1))
