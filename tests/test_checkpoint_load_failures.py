"""A checkpoint that cannot be read now is not a damaged checkpoint (issue 29, item 1): an I/O or
memory error while loading is tried again and then stops the job for a requeue, keeping the
checkpoint; only damage the checksums or the format prove falls back to an older one. Faults are
injected at the file-system boundary (tests/faults/sitecustomize.py), in real 2-rank jobs."""

import json
import shutil

import pytest

from clipscale.errors import EXIT_UNREADABLE
from clipscale.metrics import read_jsonl

from process_helpers import run, with_faults

NEWEST = "step_00000004.pt"
SAVED = ["train.steps=4", "checkpoint.every_n_steps=2", "data.workers=0"]
RESUME = ["train.steps=6", "checkpoint.every_n_steps=2", "data.workers=0", "checkpoint.resume=auto",
          "checkpoint.load_attempts=3", "checkpoint.load_retry_wait_s=0.05"]  # fmt: skip


@pytest.fixture(scope="module")
def saved(module_tmp, toy_shards):
    """A 2-rank run with checkpoints at steps 2 and 4 (copied by each test)."""
    run_dir = module_tmp("saved") / "run"
    run(2, run_dir, toy_shards, *SAVED)
    assert (run_dir / "checkpoints" / NEWEST).is_file()
    return run_dir


def copy_of(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "run")
    return tmp_path / "run"


def steps_after_resume(run_dir, logged_before: int) -> list[int]:
    return [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")[logged_before:] if "loss" in r]


@pytest.mark.slow
def test_an_io_error_on_the_newest_checkpoint_stops_for_a_requeue_and_keeps_it(saved, tmp_path, toy_shards):
    run_dir = copy_of(saved, tmp_path)
    before = len(read_jsonl(run_dir / "metrics.jsonl"))
    # the checksum read (the first open) passes; every read after it fails, on both ranks
    eio = with_faults({"name": NEWEST, "from": 2, "error": "EIO"})
    proc = run(2, run_dir, toy_shards, *RESUME, expect=EXIT_UNREADABLE, env=eio)
    errors = {line for line in proc.stderr.splitlines() if line.startswith("clipscale: error:")}
    assert len(errors) == 1, proc.stderr[-3000:]  # every rank, the same one line
    (error,) = errors
    assert NEWEST in error and "(3 attempt(s))" in error and "it is kept" in error, error
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("trying again in") == 2, proc.stderr[-3000:]  # attempts 2 and 3, after a wait
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "unreadable" and "Input/output error" in status["error"]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / NEWEST).is_file() and not (checkpoints / "abandoned").exists()
    assert (checkpoints / "latest").read_text().strip() == NEWEST
    # the requeued job (the storage healthy again) resumes from that same checkpoint
    run(2, run_dir, toy_shards, *RESUME)
    assert steps_after_resume(run_dir, before) == [5, 6]


@pytest.mark.slow
def test_a_memory_error_that_passes_is_retried_and_the_newest_checkpoint_resumes(saved, tmp_path, toy_shards):
    run_dir = copy_of(saved, tmp_path)
    before = len(read_jsonl(run_dir / "metrics.jsonl"))
    once = with_faults({"name": NEWEST, "opens": [2], "error": "MemoryError"})  # the load, once per rank
    proc = run(2, run_dir, toy_shards, *RESUME, env=once)
    assert "trying again in" in proc.stderr and "MemoryError" in proc.stderr, proc.stderr[-3000:]
    assert steps_after_resume(run_dir, before) == [5, 6]
    assert not (run_dir / "checkpoints" / "abandoned").exists()


@pytest.mark.slow
def test_a_damaged_checkpoint_falls_back_and_is_kept_aside_with_the_reason(saved, tmp_path, toy_shards):
    run_dir = copy_of(saved, tmp_path)
    newest = run_dir / "checkpoints" / NEWEST
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated: its checksum proves it
    proc = run(2, run_dir, toy_shards, *RESUME)
    assert f"checkpoint {NEWEST} is damaged (sha256 mismatch" in proc.stderr, proc.stderr[-3000:]
    assert "resumed from step_00000002.pt, older than the newest checkpoint" in proc.stderr
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    (why,) = (run_dir / "checkpoints" / "abandoned").glob(f"{NEWEST}.*.why")
    assert why.read_text().startswith("is damaged (sha256 mismatch")
    assert any(p.name.startswith(NEWEST + ".") and p.suffix != ".why" for p in why.parent.iterdir())
